//! How the client reaches the chain: the [`Transport`] trait and its toncenter v2 HTTP
//! implementation ([`Toncenter`]).
//!
//! Only four calls are needed: `sendBoc`, `runGetMethod`, `getWalletInformation` and
//! `getAddressInformation`. A liteserver transport can implement the same trait later.
//! Transient failures (connection errors, timeouts, HTTP 429 and 5xx) are retried a bounded
//! number of times with exponential back-off; everything else is reported at once.

use std::time::Duration;

use base64::Engine as _;
use serde_json::{Value, json};

use crate::Error;

/// One entry of a get-method's result stack.
#[derive(Debug, Clone, PartialEq)]
pub enum StackEntry {
    /// An integer (toncenter writes it as hex with an optional minus sign).
    Num(i128),
    /// A big integer that does not fit in i128, kept as its text.
    BigNum(String),
    /// A cell or slice, as BOC bytes.
    Cell(Vec<u8>),
    /// Anything else, kept as JSON.
    Other(Value),
}

/// The result of a get-method.
#[derive(Debug, Clone, PartialEq)]
pub struct GetMethodResult {
    pub exit_code: i64,
    pub stack: Vec<StackEntry>,
}

/// What `getWalletInformation` reports.
#[derive(Debug, Clone, PartialEq)]
pub struct WalletInfo {
    pub is_wallet: bool,
    pub balance: u128,
    pub account_state: String,
    pub seqno: Option<u32>,
}

/// What `getAddressInformation` reports.
#[derive(Debug, Clone, PartialEq)]
pub struct AddressInfo {
    pub balance: u128,
    pub state: String,
}

/// A way to reach the chain.
pub trait Transport {
    /// Sends a serialized external message.
    fn send_boc(&self, boc: &[u8]) -> Result<(), Error>;
    /// Runs a get-method with integer arguments (as `0x…` hex strings).
    fn run_get_method(
        &self,
        address: &str,
        method: &str,
        int_args: &[String],
    ) -> Result<GetMethodResult, Error>;
    /// Wallet state, balance and seqno.
    fn wallet_information(&self, address: &str) -> Result<WalletInfo, Error>;
    /// Account state and balance.
    fn address_information(&self, address: &str) -> Result<AddressInfo, Error>;
}

/// Settings of the toncenter v2 transport.
#[derive(Debug, Clone)]
pub struct ToncenterConfig {
    /// Base URL up to and including `/api/v2`, e.g. `http://127.0.0.1:8081/api/v2`.
    pub endpoint: String,
    /// Sent as `X-API-Key` when set. Never logged.
    pub api_key: Option<String>,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Attempts per call, including the first (at least 1).
    pub max_attempts: u32,
    /// First back-off delay; doubled after each failed attempt.
    pub backoff: Duration,
}

impl ToncenterConfig {
    /// Defaults for an endpoint: 10 s timeout, 4 attempts, 300 ms first back-off.
    pub fn new(endpoint: impl Into<String>) -> Self {
        ToncenterConfig {
            endpoint: endpoint.into().trim_end_matches('/').to_string(),
            api_key: None,
            timeout: Duration::from_secs(10),
            max_attempts: 4,
            backoff: Duration::from_millis(300),
        }
    }
}

/// The toncenter v2 HTTP API.
pub struct Toncenter {
    cfg: ToncenterConfig,
    agent: ureq::Agent,
}

enum Attempt {
    Retry(String),
    Fail(Error),
}

impl Toncenter {
    pub fn new(cfg: ToncenterConfig) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(cfg.timeout))
            .http_status_as_error(false)
            .build()
            .into();
        Toncenter { cfg, agent }
    }

    fn once(
        &self,
        method: &str,
        query: &[(&str, &str)],
        body: Option<&Value>,
    ) -> Result<Value, Attempt> {
        let url = format!("{}/{}", self.cfg.endpoint, method);
        let result = match body {
            None => {
                let mut req = self.agent.get(&url);
                for (k, v) in query {
                    req = req.query(*k, *v);
                }
                if let Some(key) = &self.cfg.api_key {
                    req = req.header("X-API-Key", key);
                }
                req.call()
            }
            Some(b) => {
                let mut req = self
                    .agent
                    .post(&url)
                    .header("Content-Type", "application/json");
                if let Some(key) = &self.cfg.api_key {
                    req = req.header("X-API-Key", key);
                }
                req.send(b.to_string())
            }
        };
        let mut resp = result.map_err(|e| Attempt::Retry(format!("{url}: {e}")))?;
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .read_to_string()
            .map_err(|e| Attempt::Retry(format!("{url}: reading the reply: {e}")))?;
        if status == 429 || status >= 500 {
            return Err(Attempt::Retry(format!(
                "{url}: HTTP {status}: {}",
                snippet(&text)
            )));
        }
        let v: Value = serde_json::from_str(&text).map_err(|e| {
            Attempt::Fail(Error::BadReply(format!(
                "{method}: HTTP {status}, not JSON ({e}): {}",
                snippet(&text)
            )))
        })?;
        match v.get("ok").and_then(Value::as_bool) {
            Some(true) => v.get("result").cloned().ok_or_else(|| {
                Attempt::Fail(Error::BadReply(format!("{method}: ok without result")))
            }),
            Some(false) => Err(Attempt::Fail(Error::Api {
                code: v
                    .get("code")
                    .and_then(Value::as_i64)
                    .unwrap_or(i64::from(status)),
                message: v
                    .get("error")
                    .and_then(Value::as_str)
                    .unwrap_or("(no message)")
                    .to_string(),
            })),
            None => Err(Attempt::Fail(Error::BadReply(format!(
                "{method}: HTTP {status}, no \"ok\" field: {}",
                snippet(&text)
            )))),
        }
    }

    fn call(
        &self,
        method: &str,
        query: &[(&str, &str)],
        body: Option<&Value>,
    ) -> Result<Value, Error> {
        let attempts = self.cfg.max_attempts.max(1);
        let mut delay = self.cfg.backoff;
        let mut last = String::new();
        for n in 1..=attempts {
            match self.once(method, query, body) {
                Ok(v) => return Ok(v),
                Err(Attempt::Fail(e)) => return Err(e),
                Err(Attempt::Retry(why)) => {
                    last = why;
                    if n < attempts {
                        std::thread::sleep(delay);
                        delay = delay.saturating_mul(2);
                    }
                }
            }
        }
        Err(Error::Transport(format!(
            "{last} (gave up after {attempts} attempts; check the endpoint URL, your network and the API key)"
        )))
    }
}

fn snippet(s: &str) -> String {
    let t: String = s.chars().take(200).collect();
    if t.len() < s.len() {
        format!("{t}…")
    } else {
        t
    }
}

fn parse_u128(v: Option<&Value>, what: &str) -> Result<u128, Error> {
    match v {
        Some(Value::String(s)) => s
            .parse()
            .map_err(|_| Error::BadReply(format!("{what}: {s:?} is not a number"))),
        Some(Value::Number(n)) => n
            .as_u64()
            .map(u128::from)
            .ok_or_else(|| Error::BadReply(format!("{what}: {n} is not a non-negative integer"))),
        _ => Err(Error::BadReply(format!("{what} missing"))),
    }
}

/// Parses toncenter's `[["num","0x…"], ["cell", {"bytes": "…"}], …]` stack.
pub fn parse_stack(v: &Value) -> Result<Vec<StackEntry>, Error> {
    let arr = v
        .as_array()
        .ok_or_else(|| Error::BadReply("stack is not an array".into()))?;
    arr.iter()
        .map(|e| {
            let pair = e.as_array().filter(|a| a.len() == 2);
            let Some(pair) = pair else {
                return Ok(StackEntry::Other(e.clone()));
            };
            match (pair[0].as_str(), &pair[1]) {
                (Some("num"), Value::String(s)) => Ok(parse_num(s)),
                (Some("cell" | "slice" | "tvm.Cell" | "tvm.Slice"), obj) => {
                    let b64 = obj.get("bytes").and_then(Value::as_str).unwrap_or_default();
                    base64::engine::general_purpose::STANDARD
                        .decode(b64)
                        .map(StackEntry::Cell)
                        .map_err(|e| Error::BadReply(format!("stack cell is not base64: {e}")))
                }
                _ => Ok(StackEntry::Other(e.clone())),
            }
        })
        .collect()
}

fn parse_num(s: &str) -> StackEntry {
    let (neg, digits) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let digits = digits.strip_prefix("0x").unwrap_or(digits);
    match i128::from_str_radix(digits, 16) {
        Ok(n) => StackEntry::Num(if neg { -n } else { n }),
        Err(_) => StackEntry::BigNum(s.to_string()),
    }
}

impl Transport for Toncenter {
    fn send_boc(&self, boc: &[u8]) -> Result<(), Error> {
        let b64 = base64::engine::general_purpose::STANDARD.encode(boc);
        self.call("sendBoc", &[], Some(&json!({ "boc": b64 })))
            .map(|_| ())
    }

    fn run_get_method(
        &self,
        address: &str,
        method: &str,
        int_args: &[String],
    ) -> Result<GetMethodResult, Error> {
        let stack: Vec<Value> = int_args.iter().map(|a| json!(["num", a])).collect();
        let r = self.call(
            "runGetMethod",
            &[],
            Some(&json!({ "address": address, "method": method, "stack": stack })),
        )?;
        let exit_code = r
            .get("exit_code")
            .and_then(Value::as_i64)
            .ok_or_else(|| Error::BadReply("runGetMethod: exit_code missing".into()))?;
        let stack = parse_stack(r.get("stack").unwrap_or(&Value::Array(vec![])))?;
        Ok(GetMethodResult { exit_code, stack })
    }

    fn wallet_information(&self, address: &str) -> Result<WalletInfo, Error> {
        let r = self.call("getWalletInformation", &[("address", address)], None)?;
        Ok(WalletInfo {
            is_wallet: r.get("wallet").and_then(Value::as_bool).unwrap_or(false),
            balance: parse_u128(r.get("balance"), "getWalletInformation balance")?,
            account_state: r
                .get("account_state")
                .and_then(Value::as_str)
                .unwrap_or("unknown")
                .to_string(),
            seqno: r
                .get("seqno")
                .and_then(Value::as_u64)
                .and_then(|s| u32::try_from(s).ok()),
        })
    }

    fn address_information(&self, address: &str) -> Result<AddressInfo, Error> {
        let r = self.call("getAddressInformation", &[("address", address)], None)?;
        Ok(AddressInfo {
            balance: parse_u128(r.get("balance"), "getAddressInformation balance")?,
            state: r
                .get("state")
                .and_then(Value::as_str)
                .unwrap_or("unknown")
                .to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;
    use std::sync::{Arc, Mutex};

    /// A scripted HTTP server: answers each connection with the next (status, body); records requests.
    fn serve(replies: Vec<(u16, &'static str)>) -> (String, Arc<Mutex<Vec<String>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        std::thread::spawn(move || {
            for (status, body) in replies {
                let Ok((mut s, _)) = listener.accept() else {
                    return;
                };
                let mut buf = vec![0u8; 65536];
                let mut req = Vec::new();
                // Read the head and (for POST) the body named by Content-Length.
                loop {
                    let n = s.read(&mut buf).unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    req.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&req).to_string();
                    if let Some(head_end) = text.find("\r\n\r\n") {
                        let len = text
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                            })
                            .unwrap_or(0);
                        if req.len() >= head_end + 4 + len {
                            break;
                        }
                    }
                }
                seen2
                    .lock()
                    .expect("lock")
                    .push(String::from_utf8_lossy(&req).to_string());
                let resp = format!(
                    "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes());
            }
        });
        (format!("http://{addr}/api/v2"), seen)
    }

    fn client(endpoint: String) -> Toncenter {
        let mut cfg = ToncenterConfig::new(endpoint);
        cfg.backoff = Duration::from_millis(5);
        cfg.timeout = Duration::from_secs(2);
        cfg.api_key = Some("secret-key".into());
        Toncenter::new(cfg)
    }

    #[test]
    fn get_method_stack_is_parsed_and_key_sent() {
        let (ep, seen) = serve(vec![(
            200,
            r#"{"ok":true,"result":{"exit_code":0,"gas_used":1,"stack":[["num","-0x1"],["num","0x2a"]]}}"#,
        )]);
        let r = client(ep)
            .run_get_method("EQx", "worker_hash_is_valid", &["0x01".into()])
            .expect("call");
        assert_eq!(
            r,
            GetMethodResult {
                exit_code: 0,
                stack: vec![StackEntry::Num(-1), StackEntry::Num(42)]
            }
        );
        let req = seen.lock().expect("lock")[0].clone();
        assert!(req.starts_with("POST /api/v2/runGetMethod"), "{req}");
        assert!(
            req.contains("x-api-key: secret-key") || req.contains("X-API-Key: secret-key"),
            "{req}"
        );
        assert!(req.contains(r#""stack":[["num","0x01"]]"#), "{req}");
    }

    #[test]
    fn server_errors_are_retried_within_a_bound() {
        let (ep, seen) = serve(vec![
            (502, "bad gateway"),
            (503, "busy"),
            (
                200,
                r#"{"ok":true,"result":{"wallet":true,"balance":"1500000000","account_state":"active","seqno":7}}"#,
            ),
        ]);
        let w = client(ep)
            .wallet_information("EQx")
            .expect("third attempt succeeds");
        assert_eq!(w.seqno, Some(7));
        assert_eq!(w.balance, 1_500_000_000);
        assert_eq!(seen.lock().expect("lock").len(), 3);

        let (ep, _) = serve(vec![(500, "x"), (500, "x"), (500, "x"), (500, "x")]);
        let e = client(ep).address_information("EQx").expect_err("gives up");
        let msg = e.to_string();
        assert!(
            msg.contains("HTTP 500") && msg.contains("gave up after 4 attempts"),
            "{msg}"
        );
    }

    #[test]
    fn bad_json_and_api_errors_are_not_retried() {
        let (ep, seen) = serve(vec![(200, "<html>proxy login</html>")]);
        let e = client(ep).send_boc(b"x").expect_err("not json");
        assert!(matches!(e, Error::BadReply(_)), "{e}");
        assert!(e.to_string().contains("not JSON"), "{e}");
        assert_eq!(seen.lock().expect("lock").len(), 1);

        let (ep, _) = serve(vec![(
            400,
            r#"{"ok":false,"error":"LITE_SERVER_UNKNOWN: cannot apply external message","code":400}"#,
        )]);
        let e = client(ep).send_boc(b"x").expect_err("api error");
        assert!(
            e.to_string().contains("cannot apply external message"),
            "{e}"
        );
    }

    #[test]
    fn unreachable_endpoint_times_out_with_advice() {
        // Port 9 on loopback: nothing listens, connection refused quickly.
        let mut cfg = ToncenterConfig::new("http://127.0.0.1:9/api/v2");
        cfg.max_attempts = 2;
        cfg.backoff = Duration::from_millis(1);
        let e = Toncenter::new(cfg)
            .wallet_information("EQx")
            .expect_err("refused");
        assert!(e.to_string().contains("check the endpoint URL"), "{e}");
        assert!(!e.to_string().contains("secret"), "{e}");
    }

    #[test]
    fn stack_parser_tolerates_odd_entries() {
        let v: Value = serde_json::from_str(r#"[["num","0xffffffffffffffffffffffffffffffffffff"],["list",{}],"junk",["cell",{"bytes":"te6ccgEBAQEAAgAAAA=="}]]"#).expect("json");
        let s = parse_stack(&v).expect("parse");
        assert!(matches!(s[0], StackEntry::BigNum(_)));
        assert!(matches!(s[1], StackEntry::Other(_)));
        assert!(matches!(s[2], StackEntry::Other(_)));
        assert!(matches!(s[3], StackEntry::Cell(_)));
        assert!(parse_stack(&serde_json::json!({"a":1})).is_err());
    }
}

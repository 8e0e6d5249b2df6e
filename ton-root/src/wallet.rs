//! The signing wallet (v4r2 or v5r1) and addresses.
//!
//! Keys come from a 24-word TON mnemonic or a key file holding either such a mnemonic, 64 hex
//! characters or base64 of a 32-byte Ed25519 seed. Secret material is never printed: `Debug`
//! of [`Signer`] shows the address only.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use base64::Engine as _;
use num_bigint::BigUint;
use tonlib_core::TonAddress;
use tonlib_core::cell::{BagOfCells, Cell};
use tonlib_core::message::{CommonMsgInfo, InternalMessage, TonMessage, TransferMessage};
use tonlib_core::wallet::mnemonic::{KeyPair, Mnemonic};
use tonlib_core::wallet::ton_wallet::TonWallet;
use tonlib_core::wallet::wallet_version::WalletVersion;

use crate::Error;

/// Supported wallet contracts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalletKind {
    V4R2,
    V5R1,
}

impl FromStr for WalletKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s.to_ascii_lowercase().as_str() {
            "v4r2" | "v4" => Ok(WalletKind::V4R2),
            "v5r1" | "v5" | "w5" => Ok(WalletKind::V5R1),
            other => Err(Error::Key(format!(
                "unknown wallet version {other:?}; use v4r2 or v5r1"
            ))),
        }
    }
}

impl WalletKind {
    fn version(self) -> WalletVersion {
        match self {
            WalletKind::V4R2 => WalletVersion::V4R2,
            WalletKind::V5R1 => WalletVersion::V5R1,
        }
    }
}

/// Which TON network addresses must belong to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Network {
    Mainnet,
    Testnet,
    /// A local chain (sandbox): any address flag is accepted.
    Local,
}

impl FromStr for Network {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s.to_ascii_lowercase().as_str() {
            "mainnet" => Ok(Network::Mainnet),
            "testnet" => Ok(Network::Testnet),
            "local" | "sandbox" => Ok(Network::Local),
            other => Err(Error::InvalidAddress {
                input: other.to_string(),
                reason: "unknown network; use mainnet, testnet or local".into(),
            }),
        }
    }
}

impl Network {
    fn name(self) -> &'static str {
        match self {
            Network::Mainnet => "mainnet",
            Network::Testnet => "testnet",
            Network::Local => "local",
        }
    }
}

/// Parses a user-friendly (base64 / base64url, 48 chars) or raw (`0:hex`) address and checks that
/// its testnet flag matches `network` (raw addresses carry no flag and are accepted).
pub fn parse_address(input: &str, network: Network) -> Result<TonAddress, Error> {
    let s = input.trim();
    let invalid = |reason: String| Error::InvalidAddress {
        input: input.to_string(),
        reason,
    };
    if s.len() == 48 {
        let parsed = if s.contains('-') || s.contains('_') {
            TonAddress::from_base64_url_flags(s)
        } else {
            TonAddress::from_base64_std_flags(s)
        };
        let (addr, _non_bounceable, testnet) = parsed.map_err(|e| invalid(e.to_string()))?;
        let found = if testnet {
            Network::Testnet
        } else {
            Network::Mainnet
        };
        if network != Network::Local && found != network {
            return Err(Error::WrongNetwork {
                address: s.to_string(),
                found: found.name(),
                expected: network.name(),
            });
        }
        Ok(addr)
    } else {
        TonAddress::from_hex_str(s).map_err(|e| invalid(e.to_string()))
    }
}

/// A wallet able to sign transfers.
#[derive(Clone)]
pub struct Signer {
    wallet: TonWallet,
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signer")
            .field("version", &self.wallet.version)
            .field("address", &self.wallet.address.to_base64_url())
            .finish()
    }
}

impl Signer {
    /// From a 24-word mnemonic (words separated by whitespace).
    pub fn from_mnemonic(words: &str, kind: WalletKind) -> Result<Self, Error> {
        let normalized = words.split_whitespace().collect::<Vec<_>>().join(" ");
        let m = Mnemonic::from_str(&normalized, &None).map_err(|e| {
            Error::Key(format!(
                "mnemonic rejected ({e}); it must be 24 TON mnemonic words"
            ))
        })?;
        let kp = m
            .to_key_pair()
            .map_err(|e| Error::Key(format!("mnemonic: {e}")))?;
        Self::from_key_pair(kp, kind)
    }

    /// From a 32-byte Ed25519 seed.
    pub fn from_seed(seed: &[u8; 32], kind: WalletKind) -> Result<Self, Error> {
        let kp = nacl::sign::generate_keypair(seed);
        Self::from_key_pair(
            KeyPair {
                public_key: kp.pkey.to_vec(),
                secret_key: kp.skey.to_vec(),
            },
            kind,
        )
    }

    /// From a key file: a mnemonic, 64 hex characters or base64 of a 32-byte seed.
    pub fn from_key_file(path: &Path, kind: WalletKind) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Key(format!("cannot read key file {}: {e}", path.display())))?;
        let t = text.trim();
        if t.split_whitespace().count() == 24 {
            return Self::from_mnemonic(t, kind);
        }
        let seed = if t.len() == 64 && t.bytes().all(|b| b.is_ascii_hexdigit()) {
            hex::decode(t).map_err(|e| Error::Key(e.to_string()))?
        } else {
            base64::engine::general_purpose::STANDARD
                .decode(t)
                .map_err(|_| Error::Key(format!(
                    "key file {} holds neither 24 mnemonic words, 64 hex characters nor base64 of 32 bytes",
                    path.display()
                )))?
        };
        let seed: [u8; 32] = seed.as_slice().try_into().map_err(|_| {
            Error::Key(format!(
                "key file {}: seed is {} bytes, expected 32",
                path.display(),
                seed.len()
            ))
        })?;
        Self::from_seed(&seed, kind)
    }

    fn from_key_pair(kp: KeyPair, kind: WalletKind) -> Result<Self, Error> {
        let wallet = TonWallet::new(kind.version(), kp).map_err(|e| Error::Key(e.to_string()))?;
        Ok(Signer { wallet })
    }

    /// The wallet's address.
    pub fn address(&self) -> &TonAddress {
        &self.wallet.address
    }

    /// The wallet's Ed25519 public key.
    pub fn public_key(&self) -> &[u8] {
        &self.wallet.key_pair.public_key
    }

    /// Builds the signed external message (a BOC) that makes the wallet send `value` nanotons
    /// with `body` to `dest` as a bounceable internal message.
    pub fn transfer_boc(
        &self,
        seqno: u32,
        expire_at: u32,
        dest: &TonAddress,
        value: u128,
        body: Cell,
    ) -> Result<Vec<u8>, Error> {
        let build = |e: String| Error::Build(e);
        let info = CommonMsgInfo::InternalMessage(InternalMessage {
            ihr_disabled: true,
            bounce: true,
            bounced: false,
            src: TonAddress::NULL,
            dest: dest.clone(),
            value: BigUint::from(value),
            ihr_fee: BigUint::default(),
            fwd_fee: BigUint::default(),
            created_lt: 0,
            created_at: 0,
        });
        let internal = TransferMessage::new(info, body.to_arc())
            .build()
            .map_err(|e| build(e.to_string()))?;
        let ext = self
            .wallet
            .create_external_msg(expire_at, seqno, seqno == 0, [internal.to_arc()])
            .map_err(|e| build(e.to_string()))?;
        BagOfCells::from_root(ext)
            .serialize(true)
            .map_err(|e| build(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // A public test mnemonic (from tonlib-core's own tests); never fund it.
    const MNEMONIC: &str = "fancy carpet hello mandate penalty trial consider property top vicious exit rebuild tragic profit urban major total month holiday sudden rib gather media vicious";

    #[test]
    fn mnemonic_gives_the_known_v4r2_address() {
        let s = Signer::from_mnemonic(MNEMONIC, WalletKind::V4R2).expect("mnemonic");
        assert_eq!(
            s.address().to_base64_url(),
            "EQCDM_QGggZ3qMa_f3lRPk4_qLDnLTqdi6OkMAV2NB9r5TG3"
        );
        assert!(!format!("{s:?}").contains("secret"));
    }

    #[test]
    fn wrong_mnemonics_are_rejected_clearly() {
        let e = Signer::from_mnemonic("fancy carpet hello", WalletKind::V4R2).expect_err("3 words");
        assert!(e.to_string().contains("24 TON mnemonic words"), "{e}");
        let bad = MNEMONIC.replacen("fancy", "fancyy", 1);
        let e = Signer::from_mnemonic(&bad, WalletKind::V5R1).expect_err("unknown word");
        assert!(e.to_string().contains("mnemonic rejected"), "{e}");
    }

    #[test]
    fn key_files_in_each_form() {
        let dir = std::env::temp_dir().join(format!("ton-root-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let seed = [7u8; 32];
        let hexf = dir.join("k.hex");
        std::fs::write(&hexf, hex::encode(seed)).expect("write");
        let b64 = dir.join("k.b64");
        std::fs::write(&b64, base64::engine::general_purpose::STANDARD.encode(seed))
            .expect("write");
        let a = Signer::from_key_file(&hexf, WalletKind::V5R1).expect("hex");
        let b = Signer::from_key_file(&b64, WalletKind::V5R1).expect("b64");
        assert_eq!(a.address(), b.address());
        let short = dir.join("short");
        std::fs::write(&short, hex::encode([1u8; 16])).expect("write");
        let e = Signer::from_key_file(&short, WalletKind::V4R2).expect_err("16 bytes");
        assert!(e.to_string().contains("expected 32"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn network_flags_are_checked() {
        let main = "EQCns7bYSp0igFvS1wpb5wsZjCKCV19MD5AVzI4EyxsnU73k";
        parse_address(main, Network::Mainnet).expect("mainnet address");
        let e = parse_address(main, Network::Testnet).expect_err("wrong network");
        assert!(
            e.to_string()
                .contains("is a mainnet address but --network is testnet"),
            "{e}"
        );
        parse_address(main, Network::Local).expect("local accepts any");
        let raw = "0:a7b3b6d84a9d22805bd2d70a5be70b198c2282575f4c0f9015cc8e04cb1b2753";
        parse_address(raw, Network::Testnet).expect("raw address");
        assert!(parse_address("nonsense", Network::Mainnet).is_err());
    }

    #[test]
    fn transfer_is_signed_by_the_wallet_key() {
        let s = Signer::from_seed(&[3u8; 32], WalletKind::V4R2).expect("seed");
        let dest = parse_address(
            "EQCns7bYSp0igFvS1wpb5wsZjCKCV19MD5AVzI4EyxsnU73k",
            Network::Mainnet,
        )
        .expect("addr");
        let body = crate::HashUpdate {
            kind: crate::HashKind::Image,
            change: crate::Change::Add,
            query_id: 1,
            hash: crate::Hash256([9; 32]),
        }
        .to_cell()
        .expect("body");
        let boc = s
            .transfer_boc(5, 1_900_000_000, &dest, 50_000_000, body.clone())
            .expect("boc");
        let ext = BagOfCells::parse(&boc)
            .expect("parse")
            .single_root()
            .expect("root");
        let seen = crate::publish::decode_wallet_transfer(&ext, s.public_key()).expect("decode");
        assert_eq!(seen.seqno, 5);
        assert_eq!(seen.dest, dest);
        assert_eq!(seen.value, 50_000_000);
        assert_eq!(seen.body.data(), body.data());
    }
}

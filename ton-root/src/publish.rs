//! Publishing to and checking the root contract.
//!
//! [`Publisher::apply`] is idempotent: it reads the list first and sends nothing when the change
//! is already in place. Before sending it checks everything that can be known in advance (the
//! wallet is active, is the contract's owner and can pay), then waits until the get-method shows
//! the change. [`Publisher::is_listed`] is the read-only check used by auditors and verifiers.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tonlib_core::TonAddress;
use tonlib_core::cell::{BagOfCells, Cell, CellBuilder};
use tonlib_core::tlb_types::tlb::TLB;
use tonlib_core::wallet::versioned::v4::WalletExtMsgBodyV4;
use tonlib_core::wallet::versioned::v5::WalletExtMsgBodyV5;

use crate::transport::{StackEntry, Transport};
use crate::{Change, Error, Hash256, HashKind, HashUpdate, Signer, format_ton};

/// How a publish behaves.
#[derive(Debug, Clone)]
pub struct PublishOptions {
    /// Value attached to the message; the contract returns the excess.
    pub value_nanotons: u128,
    /// Extra balance the wallet must hold beyond `value` for its own fees.
    pub fee_reserve_nanotons: u128,
    /// How long to wait for the change to show.
    pub wait: Duration,
    /// Pause between checks while waiting.
    pub poll_interval: Duration,
    /// Build and describe the message, send nothing.
    pub dry_run: bool,
}

impl Default for PublishOptions {
    fn default() -> Self {
        PublishOptions {
            value_nanotons: 50_000_000,
            fee_reserve_nanotons: 20_000_000,
            wait: Duration::from_secs(90),
            poll_interval: Duration::from_secs(2),
            dry_run: false,
        }
    }
}

/// What a publish did.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The list already had (or lacked) the hash: nothing was sent.
    AlreadyDone,
    /// `--dry-run`: the message that would be sent.
    DryRun {
        boc_base64: String,
        description: String,
    },
    /// Sent and confirmed by the get-method.
    Confirmed { seqno: u32, waited: Duration },
}

/// Talks to one root contract through one transport.
pub struct Publisher<T: Transport> {
    pub transport: T,
    pub root: TonAddress,
}

/// A decoded wallet transfer (for `--dry-run` descriptions and tests).
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedTransfer {
    pub seqno: u32,
    pub valid_until: u32,
    pub dest: TonAddress,
    pub value: u128,
    pub bounce: bool,
    pub body: Cell,
}

impl<T: Transport> Publisher<T> {
    pub fn new(transport: T, root: TonAddress) -> Self {
        Publisher { transport, root }
    }

    fn root_str(&self) -> String {
        self.root.to_base64_url()
    }

    /// Whether `hash` is in the contract's `kind` list (the get-method answers -1 or 0).
    pub fn is_listed(&self, kind: HashKind, hash: &Hash256) -> Result<bool, Error> {
        let method = kind.get_method();
        let r = self
            .transport
            .run_get_method(&self.root_str(), method, &[hash.to_stack_hex()])?;
        let fail = |reason: String| Error::GetMethod {
            method: method.into(),
            address: self.root_str(),
            reason,
        };
        if r.exit_code != 0 && r.exit_code != 1 {
            return Err(fail(format!(
                "exit code {} (is this a root contract?)",
                r.exit_code
            )));
        }
        match r.stack.first() {
            Some(StackEntry::Num(-1)) => Ok(true),
            Some(StackEntry::Num(0)) => Ok(false),
            other => Err(fail(format!("expected -1 or 0, got {other:?}"))),
        }
    }

    /// The contract's owner, read from `get_cocoon_data` (its last value is the owner address).
    pub fn owner(&self) -> Result<TonAddress, Error> {
        let method = "get_cocoon_data";
        let r = self
            .transport
            .run_get_method(&self.root_str(), method, &[])?;
        let fail = |reason: String| Error::GetMethod {
            method: method.into(),
            address: self.root_str(),
            reason,
        };
        if r.exit_code != 0 && r.exit_code != 1 {
            return Err(fail(format!("exit code {}", r.exit_code)));
        }
        let Some(StackEntry::Cell(boc)) = r.stack.last() else {
            return Err(fail("the last value is not the owner address slice".into()));
        };
        let cell = BagOfCells::parse(boc)
            .and_then(|b| b.single_root())
            .map_err(|e| fail(format!("owner slice: {e}")))?;
        cell.parser()
            .load_address()
            .map_err(|e| fail(format!("owner slice: {e}")))
    }

    /// Adds or removes a hash, idempotently. See the module docs.
    pub fn apply(
        &self,
        signer: &Signer,
        update: HashUpdate,
        opts: &PublishOptions,
    ) -> Result<Outcome, Error> {
        let want = update.change == Change::Add;
        if self.is_listed(update.kind, &update.hash)? == want && !opts.dry_run {
            return Ok(Outcome::AlreadyDone);
        }
        let wallet = signer.address().to_base64_url();
        let owner = self.owner()?;
        if &owner != signer.address() {
            return Err(Error::NotOwner {
                wallet,
                root: self.root_str(),
                owner: owner.to_base64_url(),
            });
        }
        let info = self.transport.wallet_information(&wallet)?;
        let needed = opts.value_nanotons + opts.fee_reserve_nanotons;
        if info.balance < needed {
            return Err(Error::InsufficientBalance {
                wallet,
                balance: format_ton(info.balance),
                needed: format_ton(needed),
            });
        }
        let seqno = match (info.account_state.as_str(), info.seqno) {
            ("active", Some(s)) => s,
            ("uninitialized" | "uninit", _) => 0,
            (state, _) => {
                return Err(Error::WalletNotActive {
                    wallet,
                    state: state.to_string(),
                });
            }
        };
        let now = unix_now();
        let boc = signer.transfer_boc(
            seqno,
            now + 120,
            &self.root,
            opts.value_nanotons,
            update.to_cell()?,
        )?;
        if opts.dry_run {
            use base64::Engine as _;
            let description = format!(
                "{} {} {} on root {} from wallet {} (seqno {seqno}, value {} TON, op 0x{:08x}, query_id {})",
                if want { "add" } else { "remove" },
                update.kind.noun(),
                update.hash,
                self.root_str(),
                wallet,
                format_ton(opts.value_nanotons),
                update.opcode(),
                update.query_id,
            );
            return Ok(Outcome::DryRun {
                boc_base64: base64::engine::general_purpose::STANDARD.encode(&boc),
                description,
            });
        }
        self.transport.send_boc(&boc)?;
        let start = Instant::now();
        loop {
            if self.is_listed(update.kind, &update.hash)? == want {
                return Ok(Outcome::Confirmed {
                    seqno,
                    waited: start.elapsed(),
                });
            }
            let advanced = self
                .transport
                .wallet_information(&wallet)
                .map(|w| w.seqno.is_some_and(|s| s > seqno))
                .unwrap_or(false);
            if advanced {
                // The wallet processed the message; give the contract's transaction a moment.
                std::thread::sleep(opts.poll_interval);
                if self.is_listed(update.kind, &update.hash)? == want {
                    return Ok(Outcome::Confirmed {
                        seqno,
                        waited: start.elapsed(),
                    });
                }
                return Err(Error::Rejected {
                    root: self.root_str(),
                });
            }
            if start.elapsed() >= opts.wait {
                return Err(Error::NotConfirmed {
                    waited_secs: start.elapsed().as_secs(),
                });
            }
            std::thread::sleep(opts.poll_interval);
        }
    }
}

fn unix_now() -> u32 {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    u32::try_from(secs).unwrap_or(u32::MAX)
}

/// Decodes the external message a [`Signer`] builds, checking its Ed25519 signature against
/// `public_key`, and returns its single internal transfer.
pub fn decode_wallet_transfer(ext: &Cell, public_key: &[u8]) -> Result<DecodedTransfer, Error> {
    let bad = |e: tonlib_core::cell::TonCellError| Error::Body(e.to_string());
    let mut p = ext.parser();
    if p.load_u8(2).map_err(bad)? != 0b10 {
        return Err(Error::Body("not an external inbound message".into()));
    }
    p.load_msg_address().map_err(bad)?;
    p.load_address().map_err(bad)?;
    p.load_coins().map_err(bad)?;
    if p.load_bit().map_err(bad)? {
        // State init present: only the by-reference form is produced by Signer.
        if !p.load_bit().map_err(bad)? {
            return Err(Error::Body(
                "inline state init is not supported by this decoder".into(),
            ));
        }
        p.next_reference().map_err(bad)?;
    }
    let body = if p.load_bit().map_err(bad)? {
        p.next_reference().map_err(bad)?.as_ref().clone()
    } else {
        p.load_remaining().map_err(bad)?
    };

    let bits = body.bit_len();
    if bits < 512 {
        return Err(Error::Body("signed body shorter than a signature".into()));
    }
    let data = body.data();
    let is_v5 = data.len() >= 4 && data[..4] == 0x7369_676e_u32.to_be_bytes();
    let (sig, unsigned) = if is_v5 {
        let mut b = CellBuilder::new();
        b.store_bits(bits - 512, data).map_err(bad)?;
        b.store_references(body.references()).map_err(bad)?;
        let unsigned = b.build().map_err(bad)?;
        let mut sp = body.parser();
        sp.skip_bits(bits - 512).map_err(bad)?;
        (sp.load_bits(512).map_err(bad)?, unsigned)
    } else {
        let mut sp = body.parser();
        let sig = sp.load_bits(512).map_err(bad)?;
        let rest = sp.load_remaining().map_err(bad)?;
        (sig, rest)
    };
    let ok = nacl::sign::verify(&sig, unsigned.cell_hash().as_slice(), public_key)
        .map_err(|e| Error::Body(format!("signature check: {}", e.message)))?;
    if !ok {
        return Err(Error::Body(
            "signature does not match the wallet key".into(),
        ));
    }
    let (seqno, valid_until, msgs) = if is_v5 {
        let m = WalletExtMsgBodyV5::from_cell(&unsigned).map_err(bad)?;
        (m.msg_seqno, m.valid_until, m.msgs)
    } else {
        let m = WalletExtMsgBodyV4::from_cell(&unsigned).map_err(bad)?;
        (m.msg_seqno, m.valid_until, m.msgs)
    };
    let [msg] = msgs.as_slice() else {
        return Err(Error::Body(format!(
            "{} messages in the transfer, expected 1",
            msgs.len()
        )));
    };
    let mut m = msg.parser();
    if m.load_bit().map_err(bad)? {
        return Err(Error::Body("inner message is not internal".into()));
    }
    let _ihr_disabled = m.load_bit().map_err(bad)?;
    let bounce = m.load_bit().map_err(bad)?;
    let _bounced = m.load_bit().map_err(bad)?;
    m.load_msg_address().map_err(bad)?;
    let dest = m.load_address().map_err(bad)?;
    let value = m.load_coins().map_err(bad)?;
    let value = u128::try_from(value).map_err(|_| Error::Body("value too large".into()))?;
    if m.load_bit().map_err(bad)? {
        return Err(Error::Body("extra currencies are not expected".into()));
    }
    m.load_coins().map_err(bad)?;
    m.load_coins().map_err(bad)?;
    m.load_u64(64).map_err(bad)?;
    m.load_u32(32).map_err(bad)?;
    if m.load_bit().map_err(bad)? {
        return Err(Error::Body("inner message carries a state init".into()));
    }
    let body = if m.load_bit().map_err(bad)? {
        m.next_reference().map_err(bad)?.as_ref().clone()
    } else {
        m.load_remaining().map_err(bad)?
    };
    Ok(DecodedTransfer {
        seqno,
        valid_until,
        dest,
        value,
        bounce,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::{AddressInfo, GetMethodResult, WalletInfo};
    use crate::wallet::{Network, WalletKind, parse_address};
    use std::cell::RefCell;
    use std::collections::BTreeSet;

    /// An in-memory root contract + wallet that executes what `send_boc` receives, byte for byte.
    struct MockChain {
        owner: Signer,
        root: TonAddress,
        lists: RefCell<BTreeSet<(u8, [u8; 32])>>,
        seqno: RefCell<u32>,
        balance: u128,
        sent: RefCell<u32>,
        accept_changes: bool,
    }

    fn kind_id(k: HashKind) -> u8 {
        match k {
            HashKind::Image => 0,
            HashKind::Model => 1,
            HashKind::Proxy => 2,
        }
    }

    impl Transport for &MockChain {
        fn send_boc(&self, boc: &[u8]) -> Result<(), Error> {
            *self.sent.borrow_mut() += 1;
            let ext = BagOfCells::parse(boc)
                .and_then(|b| b.single_root())
                .map_err(|e| Error::Body(e.to_string()))?;
            let t = decode_wallet_transfer(&ext, self.owner.public_key())?;
            assert_eq!(t.seqno, *self.seqno.borrow(), "replayed or skipped seqno");
            *self.seqno.borrow_mut() += 1;
            assert_eq!(t.dest, self.root);
            assert!(t.bounce);
            let u = HashUpdate::from_cell(&t.body)?;
            if self.accept_changes {
                let key = (kind_id(u.kind), u.hash.0);
                match u.change {
                    Change::Add => self.lists.borrow_mut().insert(key),
                    Change::Remove => self.lists.borrow_mut().remove(&key),
                };
            }
            Ok(())
        }
        fn run_get_method(
            &self,
            _a: &str,
            method: &str,
            args: &[String],
        ) -> Result<GetMethodResult, Error> {
            if method == "get_cocoon_data" {
                let mut b = CellBuilder::new();
                b.store_address(self.owner.address()).expect("addr");
                let boc = BagOfCells::from_root(b.build().expect("cell"))
                    .serialize(false)
                    .expect("boc");
                return Ok(GetMethodResult {
                    exit_code: 0,
                    stack: vec![StackEntry::Num(1), StackEntry::Cell(boc)],
                });
            }
            let kind = match method {
                "worker_hash_is_valid" => HashKind::Image,
                "model_hash_is_valid" => HashKind::Model,
                "proxy_hash_is_valid" => HashKind::Proxy,
                _ => {
                    return Ok(GetMethodResult {
                        exit_code: 11,
                        stack: vec![],
                    });
                }
            };
            let h: Hash256 = args[0].parse().expect("hash arg");
            let listed = self.lists.borrow().contains(&(kind_id(kind), h.0));
            Ok(GetMethodResult {
                exit_code: 0,
                stack: vec![StackEntry::Num(if listed { -1 } else { 0 })],
            })
        }
        fn wallet_information(&self, _a: &str) -> Result<WalletInfo, Error> {
            Ok(WalletInfo {
                is_wallet: true,
                balance: self.balance,
                account_state: "active".into(),
                seqno: Some(*self.seqno.borrow()),
            })
        }
        fn address_information(&self, _a: &str) -> Result<AddressInfo, Error> {
            Ok(AddressInfo {
                balance: self.balance,
                state: "active".into(),
            })
        }
    }

    fn chain(kind: WalletKind) -> MockChain {
        MockChain {
            owner: Signer::from_seed(&[42u8; 32], kind).expect("seed"),
            root: parse_address(
                "EQCns7bYSp0igFvS1wpb5wsZjCKCV19MD5AVzI4EyxsnU73k",
                Network::Mainnet,
            )
            .expect("root"),
            lists: RefCell::new(BTreeSet::new()),
            seqno: RefCell::new(3),
            balance: 2_000_000_000,
            sent: RefCell::new(0),
            accept_changes: true,
        }
    }

    fn fast() -> PublishOptions {
        PublishOptions {
            poll_interval: Duration::from_millis(1),
            wait: Duration::from_millis(50),
            ..PublishOptions::default()
        }
    }

    fn update(change: Change) -> HashUpdate {
        HashUpdate {
            kind: HashKind::Image,
            change,
            query_id: 9,
            hash: Hash256([0x5a; 32]),
        }
    }

    #[test]
    fn publish_then_republish_sends_once_for_both_wallet_versions() {
        for kind in [WalletKind::V4R2, WalletKind::V5R1] {
            let c = chain(kind);
            let p = Publisher::new(&c, c.root.clone());
            assert!(
                !p.is_listed(HashKind::Image, &Hash256([0x5a; 32]))
                    .expect("check")
            );
            let o = p
                .apply(&c.owner, update(Change::Add), &fast())
                .expect("publish");
            assert!(matches!(o, Outcome::Confirmed { seqno: 3, .. }), "{o:?}");
            assert!(
                p.is_listed(HashKind::Image, &Hash256([0x5a; 32]))
                    .expect("check")
            );
            assert_eq!(
                p.apply(&c.owner, update(Change::Add), &fast())
                    .expect("again"),
                Outcome::AlreadyDone
            );
            assert_eq!(*c.sent.borrow(), 1, "idempotent: nothing sent twice");
            let o = p
                .apply(&c.owner, update(Change::Remove), &fast())
                .expect("remove");
            assert!(matches!(o, Outcome::Confirmed { seqno: 4, .. }), "{o:?}");
            assert_eq!(
                p.apply(&c.owner, update(Change::Remove), &fast())
                    .expect("again"),
                Outcome::AlreadyDone
            );
            assert_eq!(*c.sent.borrow(), 2);
        }
    }

    #[test]
    fn dry_run_sends_nothing_and_describes_the_message() {
        let c = chain(WalletKind::V4R2);
        let p = Publisher::new(&c, c.root.clone());
        let opts = PublishOptions {
            dry_run: true,
            ..fast()
        };
        let Outcome::DryRun {
            boc_base64,
            description,
        } = p.apply(&c.owner, update(Change::Add), &opts).expect("dry")
        else {
            panic!("expected a dry run");
        };
        assert!(
            description.contains("add image hash 5a5a") && description.contains("op 0xe34b1c60"),
            "{description}"
        );
        assert!(!boc_base64.is_empty());
        assert_eq!(*c.sent.borrow(), 0);
    }

    #[test]
    fn a_wallet_that_is_not_the_owner_is_refused_before_sending() {
        let c = chain(WalletKind::V4R2);
        let other = Signer::from_seed(&[1u8; 32], WalletKind::V4R2).expect("seed");
        let p = Publisher::new(&c, c.root.clone());
        let e = p
            .apply(&other, update(Change::Add), &fast())
            .expect_err("not owner");
        assert!(matches!(e, Error::NotOwner { .. }), "{e}");
        assert_eq!(*c.sent.borrow(), 0);
    }

    #[test]
    fn too_little_balance_is_refused_before_sending() {
        let mut c = chain(WalletKind::V5R1);
        c.balance = 10_000_000;
        let p = Publisher::new(&c, c.root.clone());
        let e = p
            .apply(&c.owner, update(Change::Add), &fast())
            .expect_err("poor");
        assert!(
            e.to_string()
                .contains("has 0.01 TON, needs at least 0.07 TON"),
            "{e}"
        );
        assert_eq!(*c.sent.borrow(), 0);
    }

    #[test]
    fn a_change_the_contract_refuses_is_reported() {
        let mut c = chain(WalletKind::V4R2);
        c.accept_changes = false;
        let p = Publisher::new(&c, c.root.clone());
        let e = p
            .apply(&c.owner, update(Change::Add), &fast())
            .expect_err("rejected");
        assert!(matches!(e, Error::Rejected { .. }), "{e}");
    }

    #[test]
    fn a_tampered_signature_is_detected() {
        let c = chain(WalletKind::V4R2);
        let boc = c
            .owner
            .transfer_boc(
                1,
                2,
                &c.root,
                3,
                update(Change::Add).to_cell().expect("body"),
            )
            .expect("boc");
        let ext = BagOfCells::parse(&boc)
            .expect("boc")
            .single_root()
            .expect("root");
        let stranger = Signer::from_seed(&[9u8; 32], WalletKind::V4R2).expect("seed");
        let e = decode_wallet_transfer(&ext, stranger.public_key()).expect_err("wrong key");
        assert!(e.to_string().contains("signature does not match"), "{e}");
    }
}

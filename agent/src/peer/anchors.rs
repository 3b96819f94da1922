//! The fleet's trust anchors and revocation lists, as the operator's fleet bundle changes them.
//!
//! `deckhand fleet renew|revoke|rotate-ca|retire-ca` writes one PEM file (`fleet/bundle.pem` in the
//! bucket, on a stick, relayed by peers) holding every live agent certificate, the CA cross-certificates
//! of a rotation and each CA's revocation list. Nothing in it is trusted for where it came from: each
//! part is taken only if a fleet CA this agent trusts signed it.
//!
//! * **Anchors.** The CA installed with the agent (`--fleet-ca`) is the first. A CA certificate in the
//!   bundle signed by an anchor (a cross-certificate: the new CA's name and key, issued by the old CA)
//!   is one more: that is how a CA rotation reaches a Pi nobody touches.
//! * **Revocation lists.** The newest list (by its CRL number) signed by each anchor. The highest
//!   number is the bundle's number: a bundle is taken only if it is newer than the one held, so a
//!   replayed old bundle changes nothing.
//! * **Retirement.** A CA's list that names the serial number of the CA that introduced it (its
//!   predecessor) retires that predecessor, and with it every anchor the predecessor introduced except
//!   the successor's line: after `retire-ca`, certificates of the old CA are refused, and a CA someone
//!   cross-signed with a stolen old key is dropped with it.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer};
use x509_parser::prelude::{FromDer, SubjectPublicKeyInfo, X509Certificate};
use x509_parser::revocation_list::CertificateRevocationList;

/// The most anchors followed: a rotation adds one, and an old one is retired after it.
pub const MAX_ANCHORS: usize = 8;

/// A parsed fleet bundle: its certificates and revocation lists, and its bytes (relayed as they are).
#[derive(Clone, Debug)]
pub struct Bundle {
    pub certs: Vec<CertificateDer<'static>>,
    pub crls: Vec<CertificateRevocationListDer<'static>>,
    pub bytes: std::sync::Arc<[u8]>,
}

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("fleet bundle is {len} bytes, more than the {limit} allowed")]
    TooLarge { len: usize, limit: usize },
    #[error("fleet bundle: not PEM: {0}")]
    Pem(String),
    #[error("fleet bundle holds no revocation list")]
    NoList,
}

impl Bundle {
    pub fn parse(bytes: &[u8]) -> Result<Self, BundleError> {
        let limit = deckhand_protocol::wire::MAX_FLEET_BUNDLE;
        if bytes.len() > limit {
            return Err(BundleError::TooLarge {
                len: bytes.len(),
                limit,
            });
        }
        let certs = CertificateDer::pem_slice_iter(bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| BundleError::Pem(e.to_string()))?;
        let crls = CertificateRevocationListDer::pem_slice_iter(bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| BundleError::Pem(e.to_string()))?;
        if crls.is_empty() {
            return Err(BundleError::NoList);
        }
        Ok(Bundle {
            certs,
            crls,
            bytes: bytes.into(),
        })
    }
}

/// A fleet CA this agent trusts.
#[derive(Clone, Debug)]
pub struct Anchor {
    pub cert: CertificateDer<'static>,
    /// The CA's common name.
    pub name: String,
    pub not_after: Option<jiff::Timestamp>,
    /// Installed with the agent (`--fleet-ca`), rather than taken from a bundle's cross-certificate.
    pub installed: bool,
    /// The anchor whose signature on this one's cross-certificate made it trusted (`None`: installed).
    introduced_by: Option<usize>,
    subject: Vec<u8>,
    spki: Vec<u8>,
    serial: Vec<u8>,
}

impl Anchor {
    fn read(cert: &CertificateDer<'static>, introduced_by: Option<usize>) -> Option<Anchor> {
        let (_, x) = X509Certificate::from_der(cert.as_ref()).ok()?;
        Some(Anchor {
            cert: cert.clone(),
            name: x
                .subject()
                .iter_common_name()
                .next()
                .and_then(|c| c.as_str().ok())
                .unwrap_or("?")
                .to_owned(),
            not_after: jiff::Timestamp::from_second(x.validity().not_after.timestamp()).ok(),
            installed: introduced_by.is_none(),
            introduced_by,
            subject: x.subject().as_raw().to_vec(),
            spki: x.public_key().raw.to_vec(),
            serial: x.raw_serial().to_vec(),
        })
    }

    /// Whether `verify` accepts this CA's public key as the signer of what it checks.
    fn signed(&self, verify: impl FnOnce(&SubjectPublicKeyInfo<'_>) -> bool) -> bool {
        X509Certificate::from_der(self.cert.as_ref())
            .ok()
            .is_some_and(|(_, ca)| verify(ca.public_key()))
    }

    fn same_ca(&self, other: &Anchor) -> bool {
        self.subject == other.subject && self.spki == other.spki
    }
}

/// What this agent trusts once the installed CA and lists and a bundle are taken together.
#[derive(Clone, Debug, Default)]
pub struct Resolved {
    /// Live anchors (not retired).
    pub anchors: Vec<Anchor>,
    /// Names of the anchors retired.
    pub retired: Vec<String>,
    /// The newest verified list of each live anchor.
    pub crls: Vec<CertificateRevocationListDer<'static>>,
    /// The highest number among those lists: the bundle's number.
    pub number: Option<u64>,
    /// Parts that did not verify, each with why (logged; a bundle is taken for what does verify).
    pub refused: Vec<String>,
}

impl Resolved {
    /// The anchor that issued `cert`, if it is live, with the cross-certificate that introduced it
    /// (presented after the leaf, so a peer that does not know the new CA yet chains it to the old one).
    pub fn issuer_of(&self, cert: &CertificateDer<'_>) -> Option<&Anchor> {
        let (_, x) = X509Certificate::from_der(cert.as_ref()).ok()?;
        self.anchors.iter().find(|a| {
            a.subject == x.issuer().as_raw()
                && a.signed(|key| x.verify_signature(Some(key)).is_ok())
        })
    }
}

/// Whether `ca` (a CA certificate) is signed by `by`'s key and is valid at `now` (unix seconds).
fn cross_signed(ca: &X509Certificate<'_>, by: &Anchor, now: i64) -> bool {
    let is_ca = ca
        .basic_constraints()
        .ok()
        .flatten()
        .is_some_and(|b| b.value.ca);
    is_ca
        && ca.issuer().as_raw() == by.subject.as_slice()
        && ca.validity().not_after.timestamp() > now
        && by.signed(|key| ca.verify_signature(Some(key)).is_ok())
}

fn crl_number(crl: &CertificateRevocationList<'_>) -> Option<u64> {
    let digits = crl.crl_number()?.to_u64_digits();
    match digits.as_slice() {
        [] => Some(0),
        [n] => Some(*n),
        _ => None,
    }
}

/// The anchors, lists and number that follow from the installed CA and lists and, if given, a bundle,
/// judged at `now` (unix seconds, the trusted clock).
pub fn resolve(
    installed_ca: &CertificateDer<'static>,
    installed_crls: &[CertificateRevocationListDer<'static>],
    bundle: Option<&Bundle>,
    now: i64,
) -> Resolved {
    let mut out = Resolved::default();
    let Some(first) = Anchor::read(installed_ca, None) else {
        return out;
    };
    // Anchors: each CA certificate of the bundle signed by one already trusted, until none is new.
    let mut anchors = vec![first];
    let certs = bundle.map(|b| b.certs.as_slice()).unwrap_or_default();
    let mut changed = true;
    while changed && anchors.len() < MAX_ANCHORS {
        changed = false;
        for cert in certs {
            let Ok((_, x)) = X509Certificate::from_der(cert.as_ref()) else {
                continue;
            };
            let Some(by) = anchors.iter().position(|a| cross_signed(&x, a, now)) else {
                continue;
            };
            let Some(new) = Anchor::read(cert, Some(by)) else {
                continue;
            };
            if anchors.iter().any(|a| a.same_ca(&new)) || anchors.len() >= MAX_ANCHORS {
                continue;
            }
            anchors.push(new);
            changed = true;
        }
    }
    // Lists: the newest verified one per anchor.
    let mut newest: Vec<Option<(u64, CertificateRevocationListDer<'static>)>> =
        vec![None; anchors.len()];
    let lists = installed_crls
        .iter()
        .chain(bundle.map(|b| b.crls.as_slice()).unwrap_or_default());
    for der in lists {
        let Ok((_, crl)) = CertificateRevocationList::from_der(der.as_ref()) else {
            out.refused
                .push("a revocation list that does not parse".into());
            continue;
        };
        let signer = anchors.iter().position(|a| {
            crl.issuer().as_raw() == a.subject.as_slice()
                && a.signed(|key| crl.verify_signature(key).is_ok())
        });
        let (Some(i), Some(n)) = (signer, crl_number(&crl)) else {
            out.refused.push(format!(
                "a revocation list from {} not signed by a fleet CA this agent trusts",
                crl.issuer()
            ));
            continue;
        };
        if newest[i].as_ref().is_none_or(|(held, _)| n > *held) {
            newest[i] = Some((n, der.clone()));
        }
    }
    // Retirement: a list naming its own anchor's predecessor (or any anchor above it).
    let ancestors = |mut i: usize| {
        let mut up = Vec::new();
        while let Some(p) = anchors[i].introduced_by {
            if up.contains(&p) {
                break;
            }
            up.push(p);
            i = p;
        }
        up
    };
    let mut retirers: Vec<Vec<usize>> = vec![Vec::new(); anchors.len()];
    for (i, list) in newest.iter().enumerate() {
        let Some((_, der)) = list else { continue };
        let Ok((_, crl)) = CertificateRevocationList::from_der(der.as_ref()) else {
            continue;
        };
        for up in ancestors(i) {
            if crl
                .iter_revoked_certificates()
                .any(|r| r.raw_serial() == anchors[up].serial.as_slice())
            {
                retirers[up].push(i);
            }
        }
    }
    let retired_directly = |i: usize| !retirers[i].is_empty();
    let live = |i: usize| {
        !retired_directly(i)
            && ancestors(i).into_iter().all(|r| {
                !retired_directly(r)
                    || retirers[r]
                        .iter()
                        .any(|s| *s == i || ancestors(i).contains(s))
            })
    };
    for (i, anchor) in anchors.iter().enumerate() {
        if live(i) {
            out.anchors.push(anchor.clone());
            if let Some((n, der)) = &newest[i] {
                out.number = out.number.max(Some(*n));
                out.crls.push(der.clone());
            }
        } else {
            out.retired.push(anchor.name.clone());
        }
    }
    out
}

//! The lease database: address allocation and persistence.
//!
//! Leases are keyed by MAC. A MAC keeps its address while its lease — even an
//! expired or released one — or a reservation exists; another MAC takes an
//! expired address only when the pool has no never-used address left. The
//! first address tried for a new MAC is derived from a hash of the MAC, so a
//! rebuilt server hands out the same addresses in the same situation.
//!
//! Bound leases are saved after every change to a JSON file, written to a
//! temporary file, synced and renamed over the old one, so a crash leaves
//! either the old or the new database.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use hci_core::{Error, Result};
use serde::{Deserialize, Serialize};

use super::DhcpSettings;
use crate::names::fnv1a;

/// How long an offered address is held for the client that was offered it (s).
pub(crate) const OFFER_HOLD_SECS: u64 = 60;
/// How long a declined address is kept out of the pool (s).
pub(crate) const DECLINE_HOLD_SECS: u64 = 600;

/// One lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// Client hardware address.
    #[serde(with = "mac_serde")]
    pub mac: [u8; 6],
    /// Leased address.
    pub ip: Ipv4Addr,
    /// Expiry, seconds since the Unix epoch.
    pub expires: u64,
    /// True once ACKed (false while only offered).
    pub bound: bool,
    /// Host name the client sent (option 12), printable ASCII only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
}

mod mac_serde {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(mac: &[u8; 6], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&crate::mac::format(*mac))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 6], D::Error> {
        let s = String::deserialize(d)?;
        crate::mac::parse(&s).ok_or_else(|| D::Error::custom(format!("bad MAC {s:?}")))
    }
}

#[derive(Serialize, Deserialize)]
struct LeaseFile {
    version: u32,
    leases: Vec<Lease>,
}

/// Reads the bound leases saved in a lease file (as written by a running
/// server), without opening a database: for tools that show leases of a
/// server running in another process.
pub fn read_lease_file(path: &Path) -> Result<Vec<Lease>> {
    let bytes = std::fs::read(path)
        .map_err(|e| Error::io(format!("read lease file {}", path.display()), e))?;
    let file: LeaseFile = serde_json::from_slice(&bytes).map_err(|e| Error::Corrupt {
        what: format!("lease file {}", path.display()),
        source: Some(Box::new(e)),
    })?;
    Ok(file.leases)
}

/// Why a REQUEST was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Address outside the pool or subnet, or the MAC has another reservation.
    WrongAddress,
    /// Someone else holds it.
    Taken,
}

/// Leases of one network.
#[derive(Debug)]
pub struct LeaseDb {
    pub(crate) settings: DhcpSettings,
    leases: BTreeMap<[u8; 6], Lease>,
    by_ip: BTreeMap<Ipv4Addr, [u8; 6]>,
    declined: BTreeMap<Ipv4Addr, u64>,
    path: Option<PathBuf>,
}

impl LeaseDb {
    /// A database for `settings`, loading bound leases from `path` if it exists.
    pub fn open(settings: DhcpSettings, path: Option<PathBuf>) -> Result<Self> {
        let mut db = Self {
            settings,
            leases: BTreeMap::new(),
            by_ip: BTreeMap::new(),
            declined: BTreeMap::new(),
            path,
        };
        if let Some(p) = db.path.clone() {
            match std::fs::read(&p) {
                Ok(bytes) => {
                    let file: LeaseFile =
                        serde_json::from_slice(&bytes).map_err(|e| Error::Corrupt {
                            what: format!("lease file {}", p.display()),
                            source: Some(Box::new(e)),
                        })?;
                    for l in file.leases {
                        db.insert(l);
                    }
                    db.retain_valid();
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(format!("read lease file {}", p.display()), e)),
            }
        }
        Ok(db)
    }

    /// Every lease, in MAC order.
    pub fn leases(&self) -> Vec<Lease> {
        self.leases.values().cloned().collect()
    }

    /// The lease of `mac`, if any.
    pub fn lease(&self, mac: [u8; 6]) -> Option<&Lease> {
        self.leases.get(&mac)
    }

    /// Replaces the settings, dropping leases the new settings no longer allow.
    pub fn reconfigure(&mut self, settings: DhcpSettings) {
        self.settings = settings;
        self.retain_valid();
        self.save();
    }

    fn insert(&mut self, lease: Lease) {
        if let Some(old) = self.leases.remove(&lease.mac) {
            self.by_ip.remove(&old.ip);
        }
        if let Some(other) = self.by_ip.insert(lease.ip, lease.mac)
            && other != lease.mac
        {
            self.leases.remove(&other);
        }
        self.leases.insert(lease.mac, lease);
    }

    fn remove(&mut self, mac: [u8; 6]) {
        if let Some(old) = self.leases.remove(&mac) {
            self.by_ip.remove(&old.ip);
        }
    }

    fn retain_valid(&mut self) {
        let bad: Vec<[u8; 6]> = self
            .leases
            .values()
            .filter(|l| !self.allowed_for(l.mac, l.ip))
            .map(|l| l.mac)
            .collect();
        for mac in bad {
            self.remove(mac);
        }
    }

    /// May `mac` ever hold `ip` (ignoring other clients' leases)?
    fn allowed_for(&self, mac: [u8; 6], ip: Ipv4Addr) -> bool {
        let s = &self.settings;
        match s.reservation_for(mac) {
            Some(r) => r == ip,
            None => s.in_range(ip) && !s.is_reserved(ip) && !s.is_infrastructure(ip),
        }
    }

    fn is_declined(&self, ip: Ipv4Addr, now: u64) -> bool {
        self.declined.get(&ip).is_some_and(|until| *until > now)
    }

    /// Is `ip` usable by `mac` right now? `steal_expired`: may take another
    /// client's expired lease.
    fn available(&self, mac: [u8; 6], ip: Ipv4Addr, now: u64, steal_expired: bool) -> bool {
        if !self.allowed_for(mac, ip) || self.is_declined(ip, now) {
            return false;
        }
        match self.by_ip.get(&ip) {
            None => true,
            Some(owner) if *owner == mac => true,
            Some(owner) => steal_expired && self.leases.get(owner).is_none_or(|l| l.expires <= now),
        }
    }

    /// The address to offer `mac` (see the module docs for the order).
    pub(crate) fn choose(
        &self,
        mac: [u8; 6],
        requested: Option<Ipv4Addr>,
        now: u64,
    ) -> Option<Ipv4Addr> {
        if let Some(r) = self.settings.reservation_for(mac) {
            return (!self.is_declined(r, now)).then_some(r);
        }
        if let Some(l) = self.leases.get(&mac)
            && self.available(mac, l.ip, now, false)
        {
            return Some(l.ip);
        }
        if let Some(ip) = requested.filter(|ip| self.available(mac, *ip, now, false)) {
            return Some(ip);
        }
        let (start, end) = (
            u32::from(self.settings.range_start),
            u32::from(self.settings.range_end),
        );
        let size = u64::from(end - start) + 1;
        let first = fnv1a(&mac) % size;
        for steal in [false, true] {
            for i in 0..size {
                let off = (first + i) % size;
                let ip = Ipv4Addr::from(start + off as u32);
                if self.available(mac, ip, now, steal) {
                    return Some(ip);
                }
            }
        }
        None
    }

    /// Holds `ip` for `mac` after an OFFER (a bound lease stays bound).
    pub(crate) fn offer(&mut self, mac: [u8; 6], ip: Ipv4Addr, now: u64) {
        match self.leases.get(&mac) {
            Some(l) if l.bound && l.ip == ip && l.expires > now => {}
            _ => self.insert(Lease {
                mac,
                ip,
                expires: now + OFFER_HOLD_SECS,
                bound: false,
                hostname: None,
            }),
        }
    }

    /// Binds `ip` to `mac` for the lease time (REQUEST → ACK), or says why not.
    pub(crate) fn bind(
        &mut self,
        mac: [u8; 6],
        ip: Ipv4Addr,
        now: u64,
        hostname: Option<String>,
    ) -> std::result::Result<Lease, Refusal> {
        if !self.allowed_for(mac, ip) {
            return Err(Refusal::WrongAddress);
        }
        if !self.available(mac, ip, now, true) {
            return Err(Refusal::Taken);
        }
        let lease = Lease {
            mac,
            ip,
            expires: now + self.settings.lease_secs(),
            bound: true,
            hostname,
        };
        self.insert(lease.clone());
        self.save();
        Ok(lease)
    }

    /// Forgets an offer made to `mac` (it chose another server).
    pub(crate) fn withdraw_offer(&mut self, mac: [u8; 6]) {
        if self.leases.get(&mac).is_some_and(|l| !l.bound) {
            self.remove(mac);
        }
    }

    /// RELEASE: the lease ends now, but `mac` keeps first claim on the address.
    pub(crate) fn release(&mut self, mac: [u8; 6], ip: Ipv4Addr, now: u64) {
        if let Some(l) = self.leases.get_mut(&mac).filter(|l| l.ip == ip) {
            l.expires = now;
            l.bound = false;
            self.save();
        }
    }

    /// DECLINE: the client found `ip` in use; keep it out of the pool for a while.
    pub(crate) fn decline(&mut self, mac: [u8; 6], ip: Ipv4Addr, now: u64) {
        if self.leases.get(&mac).is_some_and(|l| l.ip == ip) {
            self.remove(mac);
            self.declined.insert(ip, now + DECLINE_HOLD_SECS);
            self.declined.retain(|_, until| *until > now);
            self.save();
        }
    }

    fn save(&self) {
        let Some(path) = &self.path else { return };
        let file = LeaseFile {
            version: 1,
            leases: self.leases.values().filter(|l| l.bound).cloned().collect(),
        };
        if let Err(e) = write_atomically(path, &file) {
            tracing::warn!(path = %path.display(), error = %e, "failed to save DHCP leases");
        }
    }
}

fn write_atomically(path: &Path, file: &LeaseFile) -> std::io::Result<()> {
    use std::io::Write;
    let bytes = serde_json::to_vec_pretty(file).map_err(std::io::Error::other)?;
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

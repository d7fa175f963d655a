//! TAP devices through `/dev/net/tun` (with `netns.rs`'s `setns`, the only
//! unsafe code of the crate).
//!
//! JUSTIFICATION: the kernel creates TAP devices only through the `TUNSETIFF`
//! ioctl on `/dev/net/tun` (netlink `RTM_NEWLINK` of kind `tun` is refused),
//! and no maintained crate exposes persistent multi-queue TAPs with a vnet
//! header; the ioctls are three and take a plain `struct ifreq`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use crate::netns::NetNs;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const IFF_TUN_EXCL: libc::c_short = -0x8000; // 0x8000 as a c_short

/// Size of the virtio-net header (with `num_buffers`) when enabled.
pub(crate) const VNET_HDR_LEN: libc::c_int = 12;

/// `struct ifreq` restricted to the name and flags members (40 bytes on Linux).
#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// How to open a TAP.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TapSpec<'a> {
    pub name: &'a str,
    pub queues: u16,
    pub vnet_hdr: bool,
    /// Fail if the device exists (used at creation, to detect foreign devices).
    pub exclusive: bool,
    /// Keep the device after the last queue descriptor closes (`TUNSETPERSIST`);
    /// otherwise the kernel deletes it with the last descriptor (fd-owned).
    pub persistent: bool,
}

fn ifreq(name: &str, flags: libc::c_short) -> io::Result<IfReq> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad interface name {name:?}"),
        ));
    }
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags,
        _pad: [0; 22],
    };
    for (dst, src) in req.name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    Ok(req)
}

fn open_queue(spec: &TapSpec<'_>, first: bool) -> io::Result<OwnedFd> {
    let file: File = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/net/tun")?;
    let mut flags = IFF_TAP | IFF_NO_PI;
    if spec.queues > 1 {
        flags |= IFF_MULTI_QUEUE;
    }
    if spec.vnet_hdr {
        flags |= IFF_VNET_HDR;
    }
    if first && spec.exclusive {
        flags |= IFF_TUN_EXCL;
    }
    let mut req = ifreq(spec.name, flags)?;
    // SAFETY: `file` is an open /dev/net/tun descriptor; TUNSETIFF reads and
    // writes a `struct ifreq`, and `req` is a live, properly sized and aligned
    // `#[repr(C)]` ifreq (name NUL-terminated by construction) for the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    if spec.vnet_hdr {
        let len: libc::c_int = VNET_HDR_LEN;
        // SAFETY: TUNSETVNETHDRSZ reads one c_int through the pointer, which
        // points to a live local for the duration of the call.
        let rc = unsafe {
            libc::ioctl(
                file.as_raw_fd(),
                TUNSETVNETHDRSZ,
                &len as *const libc::c_int,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(file.into())
}

/// Opens (creating if needed) the TAP `spec.name` in `ns`, one descriptor per
/// queue. A persistent TAP outlives the descriptors (a VMM process reopens it
/// by name); an fd-owned one goes away with the last of them. The device lives
/// in the namespace where `/dev/net/tun` was opened.
pub(crate) fn open(ns: &NetNs, spec: &TapSpec<'_>) -> io::Result<Vec<OwnedFd>> {
    ns.run(|| -> io::Result<Vec<OwnedFd>> {
        let queues = spec.queues.max(1);
        let mut fds = Vec::with_capacity(usize::from(queues));
        for i in 0..queues {
            fds.push(open_queue(spec, i == 0)?);
        }
        if let Some(first) = fds.first() {
            // SAFETY: TUNSETPERSIST takes its argument by value (an int flag);
            // the descriptor is an attached tun queue owned by `fds`.
            let rc = unsafe {
                libc::ioctl(
                    first.as_raw_fd(),
                    TUNSETPERSIST,
                    libc::c_ulong::from(spec.persistent),
                )
            };
            if rc < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(fds)
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifreq_layout_matches_the_kernel() {
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
        assert_eq!(IFF_TUN_EXCL as u16, 0x8000);
        assert!(ifreq("hci-tp-01234567", 0).is_ok());
        assert!(ifreq("sixteen-chars-xx", 0).is_err());
        assert!(ifreq("", 0).is_err());
    }
}

//! DHCP request handling: bytes in, at most one reply out.
//!
//! Nothing here trusts the packet: it is first rebuilt with only the options
//! the server uses ([`sanitize`]); malformed, foreign (BOOTREPLY, non-Ethernet,
//! relayed) and unexpected packets are dropped with a debug log, never a panic.

use std::net::Ipv4Addr;

use dhcproto::v4::{DhcpOption, Flags, HType, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};

use super::leases::{LeaseDb, Refusal};

/// Where a reply goes (UDP port 68).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// 255.255.255.255 on the bridge.
    Broadcast,
    /// The client's configured address (renewals, INFORM).
    Unicast(Ipv4Addr),
}

/// An encoded reply and its destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// Encoded DHCP message.
    pub packet: Vec<u8>,
    /// Where to send it.
    pub to: Destination,
    /// Its message type (for logs and tests).
    pub kind: MessageType,
}

fn requested_ip(msg: &Message) -> Option<Ipv4Addr> {
    match msg.opts().get(OptionCode::RequestedIpAddress) {
        Some(DhcpOption::RequestedIpAddress(ip)) => Some(*ip),
        _ => None,
    }
}

fn server_id(msg: &Message) -> Option<Ipv4Addr> {
    match msg.opts().get(OptionCode::ServerIdentifier) {
        Some(DhcpOption::ServerIdentifier(ip)) => Some(*ip),
        _ => None,
    }
}

/// Options the server reads, with their allowed value lengths.
const USED_OPTIONS: [(u8, usize, usize); 7] = [
    (53, 1, 1),   // message type
    (50, 4, 4),   // requested address
    (54, 4, 4),   // server identifier
    (61, 1, 255), // client identifier
    (55, 0, 255), // parameter request list
    (57, 2, 2),   // maximum message size
    (12, 1, 255), // host name
];

/// Offset of the options (after the fixed header and the magic cookie).
const OPTIONS_AT: usize = 240;

/// Rebuilds a request keeping only the options the server uses, checked for
/// length; `None` if the packet is not a well-formed BOOTREQUEST from an
/// Ethernet client. dhcproto's option decoders assert on lengths (debug
/// builds panic on a malformed option), so untrusted bytes never reach them
/// unfiltered.
pub(crate) fn sanitize(packet: &[u8]) -> Option<Vec<u8>> {
    let header = packet.get(..OPTIONS_AT)?;
    // op = BOOTREQUEST, htype = Ethernet, hlen = 6, magic cookie.
    if header[0] != 1 || header[1] != 1 || header[2] != 6 || header[236..240] != [99, 130, 83, 99] {
        return None;
    }
    let mut values: Vec<(u8, Vec<u8>)> = Vec::new();
    let mut rest = packet.get(OPTIONS_AT..)?;
    while let Some((&code, tail)) = rest.split_first() {
        match code {
            0 => rest = tail,
            255 => break,
            _ => {
                let (&len, tail) = tail.split_first()?;
                let value = tail.get(..usize::from(len))?;
                rest = tail.get(usize::from(len)..)?;
                if USED_OPTIONS.iter().any(|(c, _, _)| *c == code) {
                    // RFC 3396: repeated options concatenate.
                    match values.iter_mut().find(|(c, _)| *c == code) {
                        Some((_, v)) => v.extend_from_slice(value),
                        None => values.push((code, value.to_vec())),
                    }
                }
            }
        }
    }
    let mut out = header.to_vec();
    for (code, value) in values {
        let ok = USED_OPTIONS
            .iter()
            .any(|(c, min, max)| *c == code && (*min..=*max).contains(&value.len()));
        if ok {
            out.push(code);
            out.push(u8::try_from(value.len()).ok()?);
            out.extend_from_slice(&value);
        }
    }
    out.push(255);
    Some(out)
}

/// Handles one packet received on the server port at Unix time `now`.
pub fn handle_packet(db: &mut LeaseDb, packet: &[u8], now: u64) -> Option<Reply> {
    let packet = sanitize(packet)?;
    let msg = match Message::decode(&mut Decoder::new(&packet)) {
        Ok(m) => m,
        Err(e) => {
            tracing::debug!(error = %e, "dropping undecodable DHCP packet");
            return None;
        }
    };
    if msg.opcode() != Opcode::BootRequest || msg.htype() != HType::Eth || msg.hlen() != 6 {
        return None;
    }
    let mac: [u8; 6] = msg.chaddr().get(..6)?.try_into().ok()?;
    if !crate::mac::is_valid_unicast(mac) {
        return None;
    }
    if !msg.giaddr().is_unspecified() {
        tracing::debug!(giaddr = %msg.giaddr(), "ignoring relayed DHCP request (relays are not supported)");
        return None;
    }
    let kind = msg.opts().msg_type()?;
    let ours = db.settings.server;
    let mac_s = crate::mac::format(mac);
    match kind {
        MessageType::Discover => {
            let Some(ip) = db.choose(mac, requested_ip(&msg), now) else {
                tracing::warn!(mac = %mac_s, "DHCP pool exhausted");
                return None;
            };
            db.offer(mac, ip, now);
            tracing::debug!(mac = %mac_s, %ip, "DHCPOFFER");
            reply(db, &msg, MessageType::Offer, ip, true)
        }
        MessageType::Request => {
            match server_id(&msg) {
                Some(sid) if sid != ours => {
                    db.withdraw_offer(mac);
                    return None;
                }
                _ => {}
            }
            let ciaddr = msg.ciaddr();
            let Some(ip) = requested_ip(&msg).or((!ciaddr.is_unspecified()).then_some(ciaddr))
            else {
                return nak(db, &msg, "no address requested");
            };
            match db.bind(mac, ip, now, hostname(&msg)) {
                Ok(lease) => {
                    tracing::info!(mac = %mac_s, ip = %lease.ip, "DHCPACK");
                    reply(db, &msg, MessageType::Ack, ip, true)
                }
                Err(Refusal::WrongAddress) => {
                    nak(db, &msg, "requested address not valid for this client")
                }
                Err(Refusal::Taken) => nak(db, &msg, "requested address is in use"),
            }
        }
        MessageType::Decline => {
            if server_id(&msg) == Some(ours)
                && let Some(ip) = requested_ip(&msg)
            {
                tracing::warn!(mac = %mac_s, %ip, "DHCPDECLINE: address in use on the network");
                db.decline(mac, ip, now);
            }
            None
        }
        MessageType::Release => {
            if server_id(&msg).is_none_or(|s| s == ours) {
                db.release(mac, msg.ciaddr(), now);
            }
            None
        }
        MessageType::Inform => reply(db, &msg, MessageType::Ack, Ipv4Addr::UNSPECIFIED, false),
        _ => None,
    }
}

/// The client's host name (option 12), if it is a plausible one: printable
/// ASCII without spaces, at most 63 bytes.
fn hostname(msg: &Message) -> Option<String> {
    match msg.opts().get(OptionCode::Hostname) {
        Some(DhcpOption::Hostname(h))
            if !h.is_empty() && h.len() <= 63 && h.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            Some(h.clone())
        }
        _ => None,
    }
}

fn base(db: &LeaseDb, req: &Message, kind: MessageType) -> Message {
    let mut m = Message::default();
    m.set_opcode(Opcode::BootReply)
        .set_htype(HType::Eth)
        .set_xid(req.xid())
        .set_flags(req.flags())
        .set_chaddr(req.chaddr());
    m.opts_mut().insert(DhcpOption::MessageType(kind));
    m.opts_mut()
        .insert(DhcpOption::ServerIdentifier(db.settings.server));
    if let Some(DhcpOption::ClientIdentifier(id)) = req.opts().get(OptionCode::ClientIdentifier) {
        m.opts_mut()
            .insert(DhcpOption::ClientIdentifier(id.clone()));
    }
    m
}

fn reply(
    db: &LeaseDb,
    req: &Message,
    kind: MessageType,
    yiaddr: Ipv4Addr,
    with_lease: bool,
) -> Option<Reply> {
    let s = &db.settings;
    let mut m = base(db, req, kind);
    m.set_yiaddr(yiaddr).set_ciaddr(req.ciaddr());
    let o = m.opts_mut();
    if with_lease {
        let secs = s.lease_secs() as u32;
        o.insert(DhcpOption::AddressLeaseTime(secs));
        o.insert(DhcpOption::Renewal(secs / 2));
        o.insert(DhcpOption::Rebinding(secs / 8 * 7));
    }
    o.insert(DhcpOption::SubnetMask(s.subnet.netmask()));
    o.insert(DhcpOption::BroadcastAddr(s.subnet.broadcast()));
    if let Some(r) = s.router {
        o.insert(DhcpOption::Router(vec![r]));
    }
    if !s.dns.is_empty() {
        o.insert(DhcpOption::DomainNameServer(s.dns.clone()));
    }
    if let Some(mtu) = s.mtu.filter(|m| *m >= 68) {
        o.insert(DhcpOption::InterfaceMtu(mtu));
    }
    if let Some(d) = &s.domain {
        o.insert(DhcpOption::DomainName(d.clone()));
    }
    if let Some(h) = req
        .chaddr()
        .get(..6)
        .and_then(|m| <[u8; 6]>::try_from(m).ok())
        .and_then(|m| s.hostname_for(m))
    {
        o.insert(DhcpOption::Hostname(h.to_string()));
    }
    let ciaddr = req.ciaddr();
    let to = if kind == MessageType::Ack && !ciaddr.is_unspecified() {
        Destination::Unicast(ciaddr)
    } else {
        Destination::Broadcast
    };
    encode(&m, to, kind)
}

fn nak(db: &LeaseDb, req: &Message, why: &str) -> Option<Reply> {
    tracing::info!(mac = ?req.chaddr().get(..6), why, "DHCPNAK");
    let mut m = base(db, req, MessageType::Nak);
    m.set_flags(Flags::default().set_broadcast());
    m.opts_mut().insert(DhcpOption::Message(why.to_string()));
    encode(&m, Destination::Broadcast, MessageType::Nak)
}

fn encode(m: &Message, to: Destination, kind: MessageType) -> Option<Reply> {
    let mut packet = Vec::with_capacity(512);
    match m.encode(&mut Encoder::new(&mut packet)) {
        Ok(()) => Some(Reply { packet, to, kind }),
        Err(e) => {
            tracing::warn!(error = %e, "failed to encode a DHCP reply");
            None
        }
    }
}

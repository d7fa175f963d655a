//! Unit tests and fuzzing of the DHCP logic (no sockets).

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use dhcproto::v4::{DhcpOption, Flags, HType, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};
use hci_core::net::DhcpConfig;
use proptest::prelude::*;

use super::*;

const NOW: u64 = 1_700_000_000;

fn config() -> DhcpConfig {
    DhcpConfig {
        range_start: "10.7.0.100".parse().expect("ip"),
        range_end: "10.7.0.109".parse().expect("ip"),
        lease_time: Duration::from_secs(3600),
        dns: vec![
            "10.7.0.1".parse().expect("ip"),
            "2001:db8::1".parse().expect("ip"),
        ],
        reservations: vec![([2, 0, 0, 0, 0, 0x99], "10.7.0.50".parse().expect("ip"))],
    }
}

fn settings() -> DhcpSettings {
    let cidr = "10.7.0.0/24".parse().expect("cidr");
    let gw: IpAddr = "10.7.0.1".parse().expect("ip");
    DhcpSettings::from_config(
        &config(),
        cidr,
        Ipv4Addr::new(10, 7, 0, 1),
        Some(gw),
        Some(1450),
    )
    .expect("valid")
}

fn request(kind: MessageType, mac: [u8; 6], opts: &[DhcpOption], ciaddr: Ipv4Addr) -> Vec<u8> {
    let mut m = Message::default();
    m.set_opcode(Opcode::BootRequest)
        .set_htype(HType::Eth)
        .set_xid(0x1234)
        .set_chaddr(&mac)
        .set_ciaddr(ciaddr);
    m.set_flags(Flags::default().set_broadcast());
    m.opts_mut().insert(DhcpOption::MessageType(kind));
    for o in opts {
        m.opts_mut().insert(o.clone());
    }
    let mut buf = Vec::new();
    m.encode(&mut Encoder::new(&mut buf)).expect("encode");
    buf
}

fn decode(r: &Reply) -> Message {
    Message::decode(&mut Decoder::new(&r.packet)).expect("reply decodes")
}

/// DISCOVER → OFFER → REQUEST → ACK; returns the ACKed address.
fn lease(db: &mut LeaseDb, mac: [u8; 6], now: u64) -> Ipv4Addr {
    let offer = handle_packet(
        db,
        &request(MessageType::Discover, mac, &[], Ipv4Addr::UNSPECIFIED),
        now,
    )
    .expect("offer");
    assert_eq!(offer.kind, MessageType::Offer);
    let ip = decode(&offer).yiaddr();
    let req = request(
        MessageType::Request,
        mac,
        &[
            DhcpOption::RequestedIpAddress(ip),
            DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 7, 0, 1)),
        ],
        Ipv4Addr::UNSPECIFIED,
    );
    let ack = handle_packet(db, &req, now).expect("ack");
    assert_eq!(ack.kind, MessageType::Ack);
    assert_eq!(decode(&ack).yiaddr(), ip);
    ip
}

/// REQUEST for `ip` carrying `hostname`; returns the bound lease.
fn bind_with_hostname(db: &mut LeaseDb, mac: [u8; 6], ip: Ipv4Addr, hostname: &str) -> Lease {
    let req = request(
        MessageType::Request,
        mac,
        &[
            DhcpOption::RequestedIpAddress(ip),
            DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 7, 0, 1)),
            DhcpOption::Hostname(hostname.to_string()),
        ],
        Ipv4Addr::UNSPECIFIED,
    );
    let ack = handle_packet(db, &req, NOW).expect("ack");
    assert_eq!(ack.kind, MessageType::Ack);
    db.lease(mac).expect("lease").clone()
}

#[test]
fn leases_record_plausible_host_names_and_persist_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("leases.json");
    let mut db = LeaseDb::open(settings(), Some(path.clone())).expect("db");
    let (a, b) = ([2, 0, 0, 0, 1, 1], [2, 0, 0, 0, 1, 2]);
    let la = bind_with_hostname(&mut db, a, Ipv4Addr::new(10, 7, 0, 101), "vm-a");
    assert_eq!(la.hostname.as_deref(), Some("vm-a"));
    // Spaces, control characters and overlong names are not recorded.
    let lb = bind_with_hostname(&mut db, b, Ipv4Addr::new(10, 7, 0, 102), "bad name\n");
    assert_eq!(lb.hostname, None);
    let on_disk = read_lease_file(&path).expect("read");
    assert!(
        on_disk.contains(&la) && on_disk.contains(&lb),
        "{on_disk:?}"
    );
    drop(db);
    let db = LeaseDb::open(settings(), Some(path)).expect("reopen");
    assert_eq!(
        db.lease(a).and_then(|l| l.hostname.clone()).as_deref(),
        Some("vm-a")
    );
}

#[test]
fn full_exchange_carries_the_options() {
    let mut db = LeaseDb::open(settings(), None).expect("db");
    let mac = [2, 0x68, 0x63, 1, 2, 3];
    let offer = handle_packet(
        &mut db,
        &request(MessageType::Discover, mac, &[], Ipv4Addr::UNSPECIFIED),
        NOW,
    )
    .expect("offer");
    assert_eq!(offer.to, Destination::Broadcast);
    let m = decode(&offer);
    assert_eq!(m.opcode(), Opcode::BootReply);
    assert_eq!(m.xid(), 0x1234);
    assert!(settings().in_range(m.yiaddr()));
    let o = m.opts();
    assert_eq!(
        o.get(OptionCode::SubnetMask),
        Some(&DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 255, 0)))
    );
    assert_eq!(
        o.get(OptionCode::Router),
        Some(&DhcpOption::Router(vec![Ipv4Addr::new(10, 7, 0, 1)]))
    );
    assert_eq!(
        o.get(OptionCode::DomainNameServer),
        Some(&DhcpOption::DomainNameServer(vec![Ipv4Addr::new(
            10, 7, 0, 1
        )]))
    );
    assert_eq!(
        o.get(OptionCode::InterfaceMtu),
        Some(&DhcpOption::InterfaceMtu(1450))
    );
    assert_eq!(
        o.get(OptionCode::AddressLeaseTime),
        Some(&DhcpOption::AddressLeaseTime(3600))
    );
    assert_eq!(
        o.get(OptionCode::ServerIdentifier),
        Some(&DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 7, 0, 1)))
    );
    let ip = lease(&mut db, mac, NOW);
    assert_eq!(ip, m.yiaddr());
    let l = db.lease(mac).expect("lease");
    assert!(l.bound);
    assert_eq!(l.expires, NOW + 3600);
}

#[test]
fn a_mac_keeps_its_address_and_clients_do_not_collide() {
    let mut db = LeaseDb::open(settings(), None).expect("db");
    let macs: Vec<[u8; 6]> = (0..10u8).map(|i| [2, 0x68, 0x63, 0, 0, i]).collect();
    let ips: Vec<Ipv4Addr> = macs.iter().map(|m| lease(&mut db, *m, NOW)).collect();
    let mut uniq = ips.clone();
    uniq.sort();
    uniq.dedup();
    assert_eq!(uniq.len(), 10, "every client got its own address: {ips:?}");
    // The pool (10 addresses) is full: an eleventh client gets nothing.
    let extra = request(
        MessageType::Discover,
        [2, 0x68, 0x63, 0, 1, 0],
        &[],
        Ipv4Addr::UNSPECIFIED,
    );
    assert!(handle_packet(&mut db, &extra, NOW).is_none());
    // Release then come back: same address, even long after expiry.
    let rel = request(MessageType::Release, macs[3], &[], ips[3]);
    assert!(handle_packet(&mut db, &rel, NOW + 10).is_none());
    assert!(!db.lease(macs[3]).expect("kept").bound);
    assert_eq!(lease(&mut db, macs[3], NOW + 100_000), ips[3]);
    // A fresh database chooses the same first address for the same MAC.
    let mut fresh = LeaseDb::open(settings(), None).expect("db");
    assert_eq!(lease(&mut fresh, macs[0], NOW), ips[0]);
}

#[test]
fn reservations_win_and_are_never_given_to_others() {
    let mut db = LeaseDb::open(settings(), None).expect("db");
    let reserved_mac = [2, 0, 0, 0, 0, 0x99];
    assert_eq!(
        lease(&mut db, reserved_mac, NOW),
        Ipv4Addr::new(10, 7, 0, 50)
    );
    // Another client asking for the reserved address is refused.
    let req = request(
        MessageType::Request,
        [2, 0, 0, 0, 0, 1],
        &[DhcpOption::RequestedIpAddress(Ipv4Addr::new(10, 7, 0, 50))],
        Ipv4Addr::UNSPECIFIED,
    );
    assert_eq!(
        handle_packet(&mut db, &req, NOW).expect("nak").kind,
        MessageType::Nak
    );
}

#[test]
fn requests_outside_the_pool_or_taken_are_nakked() {
    let mut db = LeaseDb::open(settings(), None).expect("db");
    let a = [2, 0, 0, 0, 0, 1];
    let ip = lease(&mut db, a, NOW);
    let b = [2, 0, 0, 0, 0, 2];
    for bad in [
        ip,
        Ipv4Addr::new(10, 7, 0, 200),
        Ipv4Addr::new(192, 168, 1, 5),
        Ipv4Addr::new(10, 7, 0, 1),
    ] {
        let req = request(
            MessageType::Request,
            b,
            &[DhcpOption::RequestedIpAddress(bad)],
            Ipv4Addr::UNSPECIFIED,
        );
        let r = handle_packet(&mut db, &req, NOW).expect("reply");
        assert_eq!(r.kind, MessageType::Nak, "{bad}");
        assert_eq!(r.to, Destination::Broadcast);
    }
    // Renewal (ciaddr set, no requested address) is ACKed by unicast.
    let renew = request(MessageType::Request, a, &[], ip);
    let r = handle_packet(&mut db, &renew, NOW + 1800).expect("ack");
    assert_eq!((r.kind, r.to), (MessageType::Ack, Destination::Unicast(ip)));
    assert_eq!(db.lease(a).expect("lease").expires, NOW + 1800 + 3600);
    // A client that chose another server: our offer is withdrawn, no reply.
    let c = [2, 0, 0, 0, 0, 3];
    handle_packet(
        &mut db,
        &request(MessageType::Discover, c, &[], Ipv4Addr::UNSPECIFIED),
        NOW,
    )
    .expect("offer");
    let other = request(
        MessageType::Request,
        c,
        &[DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 7, 0, 2))],
        Ipv4Addr::UNSPECIFIED,
    );
    assert!(handle_packet(&mut db, &other, NOW).is_none());
    assert!(db.lease(c).is_none());
}

#[test]
fn decline_takes_the_address_out_of_the_pool() {
    let mut db = LeaseDb::open(settings(), None).expect("db");
    let a = [2, 0, 0, 0, 0, 1];
    let ip = lease(&mut db, a, NOW);
    let dec = request(
        MessageType::Decline,
        a,
        &[
            DhcpOption::RequestedIpAddress(ip),
            DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 7, 0, 1)),
        ],
        Ipv4Addr::UNSPECIFIED,
    );
    assert!(handle_packet(&mut db, &dec, NOW).is_none());
    let again = lease(&mut db, a, NOW + 1);
    assert_ne!(again, ip, "a declined address is not offered again at once");
}

#[test]
fn inform_gets_options_without_a_lease() {
    let mut db = LeaseDb::open(settings(), None).expect("db");
    let ciaddr = Ipv4Addr::new(10, 7, 0, 33);
    let r = handle_packet(
        &mut db,
        &request(MessageType::Inform, [2, 0, 0, 0, 0, 7], &[], ciaddr),
        NOW,
    )
    .expect("ack");
    assert_eq!(
        (r.kind, r.to),
        (MessageType::Ack, Destination::Unicast(ciaddr))
    );
    let m = decode(&r);
    assert_eq!(m.yiaddr(), Ipv4Addr::UNSPECIFIED);
    assert!(m.opts().get(OptionCode::AddressLeaseTime).is_none());
    assert!(m.opts().get(OptionCode::Router).is_some());
    assert!(db.leases().is_empty());
}

#[test]
fn leases_survive_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("dhcp-lab.json");
    let macs: Vec<[u8; 6]> = (0..4u8).map(|i| [2, 1, 2, 3, 4, i]).collect();
    let ips: Vec<Ipv4Addr> = {
        let mut db = LeaseDb::open(settings(), Some(path.clone())).expect("db");
        macs.iter().map(|m| lease(&mut db, *m, NOW)).collect()
    };
    assert!(!path.with_extension("json.tmp").exists());
    let mut db = LeaseDb::open(settings(), Some(path.clone())).expect("reopen");
    assert_eq!(db.leases().len(), 4);
    // New clients never get an address leased before the restart, and old ones keep theirs.
    let newcomer = lease(&mut db, [2, 9, 9, 9, 9, 9], NOW);
    assert!(!ips.contains(&newcomer));
    for (m, ip) in macs.iter().zip(&ips) {
        assert_eq!(lease(&mut db, *m, NOW + 5), *ip);
    }
    // A corrupt file is reported, not silently dropped.
    std::fs::write(&path, b"{not json").expect("write");
    assert!(matches!(
        LeaseDb::open(settings(), Some(path)),
        Err(hci_core::Error::Corrupt { .. })
    ));
}

#[test]
fn settings_are_validated() {
    let cidr = "10.7.0.0/24".parse().expect("cidr");
    let server = Ipv4Addr::new(10, 7, 0, 1);
    let mut c = config();
    c.range_end = "10.8.0.1".parse().expect("ip");
    assert!(DhcpSettings::from_config(&c, cidr, server, None, None).is_err());
    let mut c = config();
    c.range_start = "10.7.0.200".parse().expect("ip");
    assert!(DhcpSettings::from_config(&c, cidr, server, None, None).is_err());
    let mut c = config();
    c.reservations
        .push(([2, 0, 0, 0, 0, 0x98], "10.7.0.50".parse().expect("ip")));
    assert!(DhcpSettings::from_config(&c, cidr, server, None, None).is_err());
    assert!(
        DhcpSettings::from_config(
            &config(),
            "fd00::/64".parse().expect("cidr"),
            server,
            None,
            None
        )
        .is_err()
    );
    // A reservation on an infrastructure address would hand it to a VM.
    for infra in ["10.7.0.0", "10.7.0.255", "10.7.0.1", "10.7.0.254"] {
        let mut c = config();
        c.reservations = vec![([2, 0, 0, 0, 0, 0x98], infra.parse().expect("ip"))];
        let gw: IpAddr = "10.7.0.1".parse().expect("ip");
        let r = DhcpSettings::from_config(&c, cidr, Ipv4Addr::new(10, 7, 0, 254), Some(gw), None);
        assert!(r.is_err(), "reservation on {infra}");
    }
    // The server address avoids the gateway, the pool and reservations.
    let subnet = "10.7.0.0/24".parse().expect("cidr");
    assert_eq!(
        server_address(subnet, &config(), None),
        Some(Ipv4Addr::new(10, 7, 0, 254))
    );
    let gw: IpAddr = "10.7.0.254".parse().expect("ip");
    assert_eq!(
        server_address(subnet, &config(), Some(gw)),
        Some(Ipv4Addr::new(10, 7, 0, 253))
    );
}

fn named_settings() -> DhcpSettings {
    settings()
        .with_names(&DhcpNames {
            domain: Some("lab.example".into()),
            hostnames: vec![
                ([2, 0, 0, 0, 0, 0x99], "db-1".into()),
                ([2, 0x68, 0x63, 0, 0, 1], "web-1".into()),
            ],
        })
        .expect("valid names")
}

fn option(r: &Reply, code: OptionCode) -> Option<DhcpOption> {
    decode(r).opts().get(code).cloned()
}

#[test]
fn hostname_and_domain_are_announced_to_known_clients() {
    let mut db = LeaseDb::open(named_settings(), None).expect("db");
    let web = [2, 0x68, 0x63, 0, 0, 1];
    let offer = handle_packet(
        &mut db,
        &request(MessageType::Discover, web, &[], Ipv4Addr::UNSPECIFIED),
        NOW,
    )
    .expect("offer");
    assert_eq!(
        option(&offer, OptionCode::Hostname),
        Some(DhcpOption::Hostname("web-1".into()))
    );
    assert_eq!(
        option(&offer, OptionCode::DomainName),
        Some(DhcpOption::DomainName("lab.example".into()))
    );
    let ip = decode(&offer).yiaddr();
    let ack = handle_packet(
        &mut db,
        &request(
            MessageType::Request,
            web,
            &[
                DhcpOption::RequestedIpAddress(ip),
                DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 7, 0, 1)),
            ],
            Ipv4Addr::UNSPECIFIED,
        ),
        NOW,
    )
    .expect("ack");
    assert_eq!(ack.kind, MessageType::Ack);
    assert_eq!(
        option(&ack, OptionCode::Hostname),
        Some(DhcpOption::Hostname("web-1".into()))
    );
    // The reservation's host gets its own name with its fixed address.
    let db_mac = [2, 0, 0, 0, 0, 0x99];
    let offer = handle_packet(
        &mut db,
        &request(MessageType::Discover, db_mac, &[], Ipv4Addr::UNSPECIFIED),
        NOW,
    )
    .expect("offer");
    assert_eq!(decode(&offer).yiaddr(), Ipv4Addr::new(10, 7, 0, 50));
    assert_eq!(
        option(&offer, OptionCode::Hostname),
        Some(DhcpOption::Hostname("db-1".into()))
    );
    // An unknown client gets the domain but no host name.
    let other = handle_packet(
        &mut db,
        &request(
            MessageType::Discover,
            [2, 0, 0, 0, 7, 7],
            &[],
            Ipv4Addr::UNSPECIFIED,
        ),
        NOW,
    )
    .expect("offer");
    assert_eq!(option(&other, OptionCode::Hostname), None);
    assert!(option(&other, OptionCode::DomainName).is_some());
    // INFORM carries them too.
    let inform = handle_packet(
        &mut db,
        &request(MessageType::Inform, web, &[], Ipv4Addr::new(10, 7, 0, 33)),
        NOW,
    )
    .expect("ack");
    assert!(option(&inform, OptionCode::Hostname).is_some());
    assert!(option(&inform, OptionCode::DomainName).is_some());
    // Without names, neither option.
    let mut plain = LeaseDb::open(settings(), None).expect("db");
    let r = handle_packet(
        &mut plain,
        &request(MessageType::Discover, web, &[], Ipv4Addr::UNSPECIFIED),
        NOW,
    )
    .expect("offer");
    assert_eq!(option(&r, OptionCode::Hostname), None);
    assert_eq!(option(&r, OptionCode::DomainName), None);
}

#[test]
fn names_are_validated() {
    let mac = [2, 0, 0, 0, 0, 1];
    let ok = |domain: Option<&str>, host: &str| {
        DhcpNames {
            domain: domain.map(Into::into),
            hostnames: vec![(mac, host.into())],
        }
        .validate()
        .is_ok()
    };
    assert!(ok(Some("lab.example"), "web-1"));
    assert!(ok(None, "A1"));
    for bad in ["", "a..b", "-a.b", "a-.b", "a b", "a.b.", &"x".repeat(64)] {
        assert!(!ok(Some(bad), "web-1"), "domain {bad:?}");
    }
    for bad in [
        "",
        "web.1",
        "-web",
        "web-",
        "we b",
        "web\n",
        &"x".repeat(64),
    ] {
        assert!(!ok(None, bad), "host name {bad:?}");
    }
    let twice = DhcpNames {
        domain: None,
        hostnames: vec![(mac, "a".into()), (mac, "b".into())],
    };
    assert!(twice.validate().is_err());
    assert!(settings().with_names(&twice).is_err());
}

#[test]
fn release_is_honoured_only_from_the_holder_and_this_server() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("leases.json");
    let mut db = LeaseDb::open(settings(), Some(path.clone())).expect("db");
    let (a, b) = ([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
    let ip = lease(&mut db, a, NOW);
    // Another server's RELEASE, a RELEASE of another address, and another
    // client releasing a's address: all ignored, no reply.
    for (mac, opts, ciaddr) in [
        (
            a,
            vec![DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 7, 0, 2))],
            ip,
        ),
        (a, vec![], Ipv4Addr::new(10, 7, 0, 109)),
        (b, vec![], ip),
    ] {
        let rel = request(MessageType::Release, mac, &opts, ciaddr);
        assert!(handle_packet(&mut db, &rel, NOW + 1).is_none());
        assert!(db.lease(a).expect("kept").bound, "{mac:?} {ciaddr}");
    }
    assert_eq!(read_lease_file(&path).expect("file").len(), 1);
    // The holder's RELEASE ends the lease now, on disk too.
    let rel = request(MessageType::Release, a, &[], ip);
    assert!(handle_packet(&mut db, &rel, NOW + 2).is_none());
    let l = db.lease(a).expect("claim kept");
    assert!(!l.bound && l.expires == NOW + 2);
    assert!(read_lease_file(&path).expect("file").is_empty());
    // a comes back to its address.
    assert_eq!(lease(&mut db, a, NOW + 3), ip);
}

#[test]
fn decline_is_honoured_only_from_the_holder_and_expires() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("leases.json");
    let mut db = LeaseDb::open(settings(), Some(path.clone())).expect("db");
    let (a, b) = ([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
    let ip = lease(&mut db, a, NOW);
    let decline = |mac: [u8; 6], sid: Ipv4Addr| {
        request(
            MessageType::Decline,
            mac,
            &[
                DhcpOption::RequestedIpAddress(ip),
                DhcpOption::ServerIdentifier(sid),
            ],
            Ipv4Addr::UNSPECIFIED,
        )
    };
    let ours = Ipv4Addr::new(10, 7, 0, 1);
    // Not addressed to us, or not the holder: nothing happens.
    assert!(handle_packet(&mut db, &decline(a, Ipv4Addr::new(10, 7, 0, 2)), NOW).is_none());
    assert!(handle_packet(&mut db, &decline(b, ours), NOW).is_none());
    assert!(db.lease(a).expect("kept").bound);
    // The holder declines: lease gone (on disk too), address held back.
    assert!(handle_packet(&mut db, &decline(a, ours), NOW).is_none());
    assert!(db.lease(a).is_none());
    assert!(read_lease_file(&path).expect("file").is_empty());
    let req = request(
        MessageType::Request,
        b,
        &[DhcpOption::RequestedIpAddress(ip)],
        Ipv4Addr::UNSPECIFIED,
    );
    assert_eq!(
        handle_packet(&mut db, &req, NOW + 1).expect("nak").kind,
        MessageType::Nak
    );
    // After the hold, the address is usable again.
    let later = NOW + leases::DECLINE_HOLD_SECS + 1;
    assert_eq!(
        handle_packet(&mut db, &req, later).expect("ack").kind,
        MessageType::Ack
    );
}

#[test]
fn foreign_and_conflicting_packets_are_ignored() {
    let mut db = LeaseDb::open(settings(), None).expect("db");
    let a = [2, 0, 0, 0, 0, 1];
    let discover = request(MessageType::Discover, a, &[], Ipv4Addr::UNSPECIFIED);
    // Another server's OFFER seen on the bridge (BOOTREPLY).
    let mut reply = discover.clone();
    reply[0] = 2;
    assert!(handle_packet(&mut db, &reply, NOW).is_none());
    // Relayed (giaddr set), non-Ethernet, multicast chaddr, no message type.
    let mut relayed = discover.clone();
    relayed[24..28].copy_from_slice(&[10, 9, 9, 9]);
    let mut token_ring = discover.clone();
    token_ring[1] = 6;
    let multicast = request(
        MessageType::Discover,
        [3, 0, 0, 0, 0, 1],
        &[],
        Ipv4Addr::UNSPECIFIED,
    );
    let mut bootp = discover.clone();
    bootp.truncate(240);
    bootp.push(255);
    for p in [&relayed, &token_ring, &multicast, &bootp] {
        assert!(handle_packet(&mut db, p, NOW).is_none());
    }
    // Server-to-client message types sent to the server.
    for kind in [MessageType::Offer, MessageType::Ack, MessageType::Nak] {
        assert!(
            handle_packet(&mut db, &request(kind, a, &[], Ipv4Addr::UNSPECIFIED), NOW).is_none()
        );
    }
    assert!(db.leases().is_empty(), "{:?}", db.leases());
    // A REQUEST naming an address and a different ciaddr: the requested one
    // is what gets checked (and it is someone else's here).
    let ip = lease(&mut db, a, NOW);
    let b = [2, 0, 0, 0, 0, 2];
    let req = request(
        MessageType::Request,
        b,
        &[DhcpOption::RequestedIpAddress(ip)],
        Ipv4Addr::new(10, 7, 0, 105),
    );
    assert_eq!(
        handle_packet(&mut db, &req, NOW).expect("nak").kind,
        MessageType::Nak
    );
    assert_eq!(db.lease(a).expect("a keeps it").ip, ip);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Random bytes never panic and never produce a reply.
    #[test]
    fn random_bytes_are_harmless(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let mut db = LeaseDb::open(named_settings(), None).expect("db");
        let _ = handle_packet(&mut db, &bytes, NOW);
    }

    /// Valid-looking requests with random fields and options never panic, and
    /// whatever is ACKed is a valid address for that client.
    #[test]
    fn random_requests_keep_the_invariants(
        ops in proptest::collection::vec((0u8..8, any::<u8>(), any::<[u8; 4]>(), any::<bool>(), any::<bool>()), 1..40),
    ) {
        let mut db = LeaseDb::open(settings(), None).expect("db");
        for (kind, mac_low, ip, with_req, with_sid) in ops {
            let kinds = [MessageType::Discover, MessageType::Request, MessageType::Decline, MessageType::Release,
                MessageType::Inform, MessageType::Offer, MessageType::Ack, MessageType::Nak];
            // MACs 0..16; 0x99 is the reservation's.
            let mac = match mac_low % 17 {
                16 => [2, 0, 0, 0, 0, 0x99],
                n => [2, 0x68, 0x63, 0, 0, n],
            };
            let ip = Ipv4Addr::from(ip);
            let mut opts = Vec::new();
            if with_req { opts.push(DhcpOption::RequestedIpAddress(ip)); }
            if with_sid { opts.push(DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 7, 0, 1))); }
            let pkt = request(kinds[usize::from(kind)], mac, &opts, if with_req { Ipv4Addr::UNSPECIFIED } else { ip });
            if let Some(r) = handle_packet(&mut db, &pkt, NOW) {
                let m = decode(&r);
                if r.kind == MessageType::Ack && !m.yiaddr().is_unspecified() {
                    let s = settings();
                    prop_assert!(s.in_range(m.yiaddr()) || s.reservation_for(mac) == Some(m.yiaddr()));
                }
            }
            let leases = db.leases();
            let s = settings();
            for l in &leases {
                // Reserved addresses only to their MAC; never the server, router,
                // network or broadcast address; nothing outside the pool otherwise.
                match s.reservation_for(l.mac) {
                    Some(r) => prop_assert_eq!(l.ip, r),
                    None => prop_assert!(s.in_range(l.ip) && !s.is_reserved(l.ip) && !s.is_infrastructure(l.ip), "{:?}", l),
                }
            }
            let mut ips: Vec<_> = leases.iter().filter(|l| l.expires > NOW).map(|l| l.ip).collect();
            let n = ips.len();
            ips.sort();
            ips.dedup();
            prop_assert_eq!(ips.len(), n, "two live leases share an address");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    /// Well-formed headers followed by random option bytes (where dhcproto's
    /// own decoders are fragile) never panic.
    #[test]
    fn random_options_are_harmless(opts in proptest::collection::vec(any::<u8>(), 0..400), kind in 1u8..9) {
        let mut pkt = request(MessageType::Discover, [2, 0, 0, 0, 0, 1], &[], Ipv4Addr::UNSPECIFIED);
        pkt.truncate(240);
        pkt.extend_from_slice(&[53, 1, kind]);
        pkt.extend_from_slice(&opts);
        let mut db = LeaseDb::open(settings(), None).expect("db");
        let _ = handle_packet(&mut db, &pkt, NOW);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Valid packets of every kind, truncated and with random bytes
    /// overwritten: never a panic, and any reply decodes and goes to the
    /// client port's broadcast or to a unicast address.
    #[test]
    fn mutated_packets_are_harmless(
        kind in 0usize..5,
        cut in any::<prop::sample::Index>(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..12),
    ) {
        let kinds = [MessageType::Discover, MessageType::Request, MessageType::Decline,
            MessageType::Release, MessageType::Inform];
        let mut pkt = request(
            kinds[kind],
            [2, 0x68, 0x63, 0, 0, 1],
            &[
                DhcpOption::RequestedIpAddress(Ipv4Addr::new(10, 7, 0, 101)),
                DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 7, 0, 1)),
                DhcpOption::Hostname("web-1".into()),
                DhcpOption::ClientIdentifier(vec![1, 2, 0x68, 0x63, 0, 0, 1]),
                DhcpOption::ParameterRequestList(vec![OptionCode::Hostname, OptionCode::DomainName]),
            ],
            Ipv4Addr::UNSPECIFIED,
        );
        for (at, byte) in flips {
            let i = at.index(pkt.len());
            pkt[i] = byte;
        }
        pkt.truncate(cut.index(pkt.len() + 1));
        let mut db = LeaseDb::open(named_settings(), None).expect("db");
        if let Some(r) = handle_packet(&mut db, &pkt, NOW) {
            let m = Message::decode(&mut Decoder::new(&r.packet));
            prop_assert!(m.is_ok(), "undecodable reply {:?}", r);
        }
    }
}

#[test]
fn fragile_options_are_filtered_before_decoding() {
    // ClientNetworkInterface (94) with a bad length makes dhcproto assert in debug builds.
    let mut pkt = request(
        MessageType::Discover,
        [2, 0, 0, 0, 0, 1],
        &[],
        Ipv4Addr::UNSPECIFIED,
    );
    pkt.truncate(240);
    pkt.extend_from_slice(&[53, 1, 1, 94, 0, 255]);
    let mut db = LeaseDb::open(settings(), None).expect("db");
    assert_eq!(
        handle_packet(&mut db, &pkt, NOW).expect("offer").kind,
        MessageType::Offer
    );
    // Truncated option: dropped.
    pkt.truncate(240);
    pkt.extend_from_slice(&[53, 1, 1, 50, 4, 10]);
    assert!(handle_packet(&mut db, &pkt, NOW).is_none());
}

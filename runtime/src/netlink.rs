//! The few rtnetlink requests that wire a pod to a host bridge, made in-process (no `ip` or
//! `nsenter` process per pod): a veth pair whose inner end is born `eth0` in the pod's network
//! namespace, that end's address and default route, and the removal of a host end.
//!
//! Requests are built here byte by byte (`Message`, pure and unit-tested) and sent on a
//! `NETLINK_ROUTE` socket; each is acknowledged or fails with the kernel's error. A socket acts
//! in the network namespace it was opened in: `wire_blocking` opens one on the host, then
//! moves its own thread into the pod's namespace and opens another there. That thread is one
//! of its own (`wire`), never a pooled one, since it does not come back.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, OwnedFd};

use rustix::net::netlink::SocketAddrNetlink;
use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType};

const NLMSG_HEADER_BYTES: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;

const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_NEWADDR: u16 = 20;
const RTM_NEWROUTE: u16 = 24;

const IFLA_IFNAME: u16 = 3;
const IFLA_MASTER: u16 = 10;
const IFLA_LINKINFO: u16 = 18;
const IFLA_NET_NS_PID: u16 = 19;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const VETH_INFO_PEER: u16 = 1;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;

const AF_UNSPEC: u8 = 0;
const AF_INET: u8 = 2;
const IFF_UP: u32 = 1;
const RT_TABLE_MAIN: u8 = 254;
const RTPROT_BOOT: u8 = 3;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RTN_UNICAST: u8 = 1;

/// How many datagrams a request reads at most while looking for its acknowledgement.
const MAX_REPLIES_PER_REQUEST: usize = 16;
/// How long one read of a reply may wait (the kernel answers at once; this bounds a wiring
/// thread that would otherwise wait forever).
const REPLY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// One netlink request being built: the header, a fixed struct, then attributes, some nested.
#[derive(Debug)]
struct Message {
    bytes: Vec<u8>,
    /// Where each open nested attribute starts.
    open: Vec<usize>,
}

impl Message {
    fn new(message_type: u16, flags: u16) -> Self {
        let mut bytes = vec![0; NLMSG_HEADER_BYTES];
        bytes[4..6].copy_from_slice(&message_type.to_ne_bytes());
        bytes[6..8].copy_from_slice(&(flags | NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        Self {
            bytes,
            open: Vec::new(),
        }
    }

    fn pad(&mut self) {
        while !self.bytes.len().is_multiple_of(4) {
            self.bytes.push(0);
        }
    }

    /// Appends a fixed struct (`ifinfomsg`, `ifaddrmsg`, `rtmsg`).
    fn push(&mut self, bytes: &[u8]) -> &mut Self {
        self.bytes.extend_from_slice(bytes);
        self.pad();
        self
    }

    fn attribute(&mut self, kind: u16, data: &[u8]) -> &mut Self {
        let length = u16::try_from(4 + data.len()).unwrap_or(u16::MAX);
        self.bytes.extend_from_slice(&length.to_ne_bytes());
        self.bytes.extend_from_slice(&kind.to_ne_bytes());
        self.bytes.extend_from_slice(data);
        self.pad();
        self
    }

    /// A string attribute, NUL-terminated as the kernel's interface names are.
    fn name(&mut self, kind: u16, name: &str) -> &mut Self {
        let mut data = name.as_bytes().to_vec();
        data.push(0);
        self.attribute(kind, &data)
    }

    fn begin(&mut self, kind: u16) -> &mut Self {
        self.open.push(self.bytes.len());
        self.attribute(kind, &[])
    }

    fn end(&mut self) -> &mut Self {
        if let Some(start) = self.open.pop() {
            let length = u16::try_from(self.bytes.len() - start).unwrap_or(u16::MAX);
            self.bytes[start..start + 2].copy_from_slice(&length.to_ne_bytes());
        }
        self
    }

    /// The bytes to send, with their length and sequence number in the header.
    fn finish(&self, sequence: u32) -> Vec<u8> {
        let mut bytes = self.bytes.clone();
        let length = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
        bytes[0..4].copy_from_slice(&length.to_ne_bytes());
        bytes[8..12].copy_from_slice(&sequence.to_ne_bytes());
        bytes
    }
}

/// `struct ifinfomsg` of an interface (`index` 0: none yet), with `flags` set.
fn ifinfomsg(index: u32, flags: u32) -> [u8; 16] {
    let mut bytes = [0; 16];
    bytes[0] = AF_UNSPEC;
    bytes[4..8].copy_from_slice(&index.to_ne_bytes());
    bytes[8..12].copy_from_slice(&flags.to_ne_bytes());
    // ifi_change: only the flags given are changed.
    bytes[12..16].copy_from_slice(&flags.to_ne_bytes());
    bytes
}

/// Creates veth `host_end`, up and enslaved to the interface `bridge_index`, whose peer is
/// born `inner_end` in the network namespace of process `pid`; down: a veth end cannot open
/// before its peer exists (ENOTCONN), so the peer is set up from inside.
fn add_veth(host_end: &str, bridge_index: u32, inner_end: &str, pid: u32) -> Message {
    let mut message = Message::new(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL);
    message
        .push(&ifinfomsg(0, IFF_UP))
        .name(IFLA_IFNAME, host_end)
        .attribute(IFLA_MASTER, &bridge_index.to_ne_bytes())
        .begin(IFLA_LINKINFO)
        .attribute(IFLA_INFO_KIND, b"veth")
        .begin(IFLA_INFO_DATA)
        .begin(VETH_INFO_PEER)
        .push(&ifinfomsg(0, 0))
        .name(IFLA_IFNAME, inner_end)
        .attribute(IFLA_NET_NS_PID, &pid.to_ne_bytes())
        .end()
        .end()
        .end();
    message
}

fn delete_link(name: &str) -> Message {
    let mut message = Message::new(RTM_DELLINK, 0);
    message.push(&ifinfomsg(0, 0)).name(IFLA_IFNAME, name);
    message
}

fn set_up(index: u32) -> Message {
    let mut message = Message::new(RTM_NEWLINK, 0);
    message.push(&ifinfomsg(index, IFF_UP));
    message
}

fn add_address(index: u32, address: Ipv4Addr, prefix_len: u8) -> Message {
    let mut ifaddrmsg = [0; 8];
    ifaddrmsg[0] = AF_INET;
    ifaddrmsg[1] = prefix_len;
    ifaddrmsg[3] = RT_SCOPE_UNIVERSE;
    ifaddrmsg[4..8].copy_from_slice(&index.to_ne_bytes());
    let mut message = Message::new(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL);
    message
        .push(&ifaddrmsg)
        .attribute(IFA_LOCAL, &address.octets())
        .attribute(IFA_ADDRESS, &address.octets());
    message
}

fn add_default_route(index: u32, gateway: Ipv4Addr) -> Message {
    let rtmsg = [
        AF_INET,
        0, // dst_len: the default route
        0,
        0,
        RT_TABLE_MAIN,
        RTPROT_BOOT,
        RT_SCOPE_UNIVERSE,
        RTN_UNICAST,
        0,
        0,
        0,
        0,
    ];
    let mut message = Message::new(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL);
    message
        .push(&rtmsg)
        .attribute(RTA_GATEWAY, &gateway.octets())
        .attribute(RTA_OIF, &index.to_ne_bytes());
    message
}

/// What the kernel answered to the request `sequence` in `datagram`: `Some(Ok)` for its
/// acknowledgement, `Some(Err)` for its error, `None` when the datagram holds neither.
fn acknowledgement(datagram: &[u8], sequence: u32) -> Option<io::Result<()>> {
    let mut rest = datagram;
    while rest.len() >= NLMSG_HEADER_BYTES {
        let word = |at: usize| -> [u8; 4] { [rest[at], rest[at + 1], rest[at + 2], rest[at + 3]] };
        let length = u32::from_ne_bytes(word(0)) as usize;
        let message_type = u16::from_ne_bytes([rest[4], rest[5]]);
        let message_sequence = u32::from_ne_bytes(word(8));
        if length < NLMSG_HEADER_BYTES || length > rest.len() {
            return Some(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a malformed netlink reply",
            )));
        }
        if message_type == NLMSG_ERROR && message_sequence == sequence {
            if length < NLMSG_HEADER_BYTES + 4 {
                return Some(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "a netlink error reply without its code",
                )));
            }
            let code = i32::from_ne_bytes(word(NLMSG_HEADER_BYTES));
            return Some(if code == 0 {
                Ok(())
            } else {
                Err(io::Error::from_raw_os_error(-code))
            });
        }
        let aligned = (length + 3) & !3;
        rest = &rest[aligned.min(rest.len())..];
    }
    None
}

/// A `NETLINK_ROUTE` socket, acting in the network namespace it was opened in.
struct RouteSocket {
    fd: OwnedFd,
    sequence: u32,
}

impl RouteSocket {
    fn open() -> io::Result<Self> {
        let fd = rustix::net::socket_with(
            AddressFamily::NETLINK,
            SocketType::RAW,
            SocketFlags::CLOEXEC,
            // `NETLINK_ROUTE` is protocol 0.
            None,
        )?;
        rustix::net::bind(&fd, &SocketAddrNetlink::new(0, 0))?;
        // The kernel (port 0) as the destination of every request.
        rustix::net::connect(&fd, &SocketAddrNetlink::new(0, 0))?;
        rustix::net::sockopt::set_socket_timeout(
            &fd,
            rustix::net::sockopt::Timeout::Recv,
            Some(REPLY_TIMEOUT),
        )?;
        Ok(Self { fd, sequence: 0 })
    }

    /// Sends `message` and waits for its acknowledgement.
    fn request(&mut self, message: &Message) -> io::Result<()> {
        self.sequence = self.sequence.wrapping_add(1);
        let bytes = message.finish(self.sequence);
        rustix::net::send(&self.fd, &bytes, SendFlags::empty())?;
        let mut buffer = vec![0u8; 8192];
        for _ in 0..MAX_REPLIES_PER_REQUEST {
            let (length, _) = rustix::net::recv(&self.fd, &mut buffer[..], RecvFlags::empty())?;
            if let Some(answer) = acknowledgement(&buffer[..length], self.sequence) {
                return answer;
            }
        }
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the kernel did not acknowledge the request",
        ))
    }

    /// The index of the interface `name` in this socket's namespace.
    fn index_of(&self, name: &str) -> Result<u32, String> {
        rustix::net::netdevice::name_to_index(self.fd.as_fd(), name)
            .map_err(|error| format!("find interface {name}: {error}"))
    }
}

/// What to wire: a pod's network namespace (that of process `pid`) to a bridge of the host.
#[derive(Debug, Clone)]
pub(crate) struct Wiring {
    pub(crate) bridge: String,
    pub(crate) host_end: String,
    pub(crate) pid: u32,
    pub(crate) address: Ipv4Addr,
    pub(crate) prefix_len: u8,
    pub(crate) gateway: Ipv4Addr,
}

/// The name of a pod's interface in its namespace.
const INNER_END: &str = "eth0";

/// Wires as `wiring` says, on a thread of its own that enters the pod's namespace; a host end
/// made before a failure is removed.
pub(crate) async fn wire(wiring: Wiring) -> Result<(), String> {
    let (done, result) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("flotilla-wire".to_owned())
        .spawn(move || {
            let _ = done.send(wire_blocking(&wiring));
        })
        .map_err(|error| format!("start a thread to wire: {error}"))?;
    result
        .await
        .map_err(|_| "the wiring thread ended without an answer".to_owned())?
}

/// The error of the step `what`, for `map_err`.
fn step(what: &str) -> impl FnOnce(io::Error) -> String {
    let what = what.to_owned();
    move |error| format!("{what}: {error}")
}

/// Blocking, and it leaves the calling thread in the pod's namespace: only for a thread that
/// ends after it.
fn wire_blocking(wiring: &Wiring) -> Result<(), String> {
    let mut host = RouteSocket::open().map_err(step("open a netlink socket"))?;
    let bridge_index = host.index_of(&wiring.bridge)?;
    host.request(&add_veth(
        &wiring.host_end,
        bridge_index,
        INNER_END,
        wiring.pid,
    ))
    .map_err(step(&format!(
        "create veth {} into the namespace of process {}",
        wiring.host_end, wiring.pid
    )))?;
    let inside = configure_inside(wiring);
    if inside.is_err() {
        // The pair would stay while its namespace lives.
        let _ = host.request(&delete_link(&wiring.host_end));
    }
    inside
}

fn configure_inside(wiring: &Wiring) -> Result<(), String> {
    let namespace = std::fs::File::open(format!("/proc/{}/ns/net", wiring.pid))
        .map_err(step("open the pod's network namespace"))?;
    rustix::thread::move_into_link_name_space(
        namespace.as_fd(),
        Some(rustix::thread::LinkNameSpaceType::Network),
    )
    .map_err(|error| format!("enter the pod's network namespace: {error}"))?;
    let mut inside = RouteSocket::open().map_err(step("open a netlink socket in the pod"))?;
    let index = inside.index_of(INNER_END)?;
    inside
        .request(&set_up(index))
        .map_err(step("set eth0 up"))?;
    inside
        .request(&add_address(index, wiring.address, wiring.prefix_len))
        .map_err(step(&format!(
            "add {}/{} to eth0",
            wiring.address, wiring.prefix_len
        )))?;
    inside
        .request(&add_default_route(index, wiring.gateway))
        .map_err(step(&format!("route by default via {}", wiring.gateway)))
}

/// Deletes the interface `name` of the host's namespace if it exists.
pub(crate) fn delete_link_blocking(name: &str) -> Result<(), String> {
    let mut host =
        RouteSocket::open().map_err(|error| format!("open a netlink socket: {error}"))?;
    match host.request(&delete_link(name)) {
        Ok(()) => Ok(()),
        Err(error) if error.raw_os_error() == Some(rustix::io::Errno::NODEV.raw_os_error()) => {
            Ok(())
        }
        Err(error) => Err(format!("delete interface {name}: {error}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(bytes: &[u8], at: usize) -> u16 {
        u16::from_ne_bytes([bytes[at], bytes[at + 1]])
    }

    /// The attributes at the top level of `bytes` from `start`: (type, payload).
    fn attributes(bytes: &[u8], start: usize) -> Vec<(u16, Vec<u8>)> {
        let mut found = Vec::new();
        let mut at = start;
        while at + 4 <= bytes.len() {
            let length = usize::from(u16_at(bytes, at));
            assert!(
                length >= 4 && at + length <= bytes.len(),
                "attribute at {at}"
            );
            found.push((u16_at(bytes, at + 2), bytes[at + 4..at + length].to_vec()));
            at += (length + 3) & !3;
        }
        found
    }

    #[test]
    fn a_request_carries_its_length_sequence_and_asks_for_an_acknowledgement() {
        let bytes = set_up(7).finish(42);
        assert_eq!(bytes.len(), NLMSG_HEADER_BYTES + 16);
        assert_eq!(
            u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize,
            bytes.len()
        );
        assert_eq!(u16_at(&bytes, 4), RTM_NEWLINK);
        assert_eq!(u16_at(&bytes, 6), NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(
            u32::from_ne_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]),
            42
        );
        assert_eq!(
            u32::from_ne_bytes([bytes[20], bytes[21], bytes[22], bytes[23]]),
            7,
            "the interface index"
        );
    }

    #[test]
    fn a_veth_request_nests_its_peer_born_in_the_pods_namespace() {
        let bytes = add_veth("flvabc", 9, "eth0", 4321).finish(1);
        assert_eq!(u16_at(&bytes, 6) & NLM_F_CREATE, NLM_F_CREATE);
        let top = attributes(&bytes, NLMSG_HEADER_BYTES + 16);
        let kinds: Vec<u16> = top.iter().map(|(kind, _)| *kind).collect();
        assert_eq!(kinds, vec![IFLA_IFNAME, IFLA_MASTER, IFLA_LINKINFO]);
        assert_eq!(top[0].1, b"flvabc\0");
        assert_eq!(top[1].1, 9u32.to_ne_bytes());
        let link_info = attributes(&top[2].1, 0);
        assert_eq!(link_info[0], (IFLA_INFO_KIND, b"veth".to_vec()));
        let data = attributes(&link_info[1].1, 0);
        assert_eq!(data[0].0, VETH_INFO_PEER);
        let peer = &data[0].1;
        assert_eq!(
            bytes[NLMSG_HEADER_BYTES + 8..NLMSG_HEADER_BYTES + 12],
            IFF_UP.to_ne_bytes(),
            "the host end is born up"
        );
        assert_eq!(peer[8..12], [0; 4], "the peer is set up from inside");
        let peer_attributes = attributes(peer, 16);
        assert_eq!(peer_attributes[0], (IFLA_IFNAME, b"eth0\0".to_vec()));
        assert_eq!(
            peer_attributes[1],
            (IFLA_NET_NS_PID, 4321u32.to_ne_bytes().to_vec())
        );
    }

    #[test]
    fn an_address_and_a_default_route_name_the_interface_and_the_gateway() {
        let address: Ipv4Addr = "10.244.1.7".parse().expect("an address");
        let bytes = add_address(3, address, 24).finish(1);
        assert_eq!(bytes[NLMSG_HEADER_BYTES], AF_INET);
        assert_eq!(bytes[NLMSG_HEADER_BYTES + 1], 24);
        let found = attributes(&bytes, NLMSG_HEADER_BYTES + 8);
        assert_eq!(found[0], (IFA_LOCAL, vec![10, 244, 1, 7]));
        assert_eq!(found[1], (IFA_ADDRESS, vec![10, 244, 1, 7]));

        let bytes = add_default_route(3, "10.244.1.1".parse().expect("an address")).finish(1);
        assert_eq!(bytes[NLMSG_HEADER_BYTES + 1], 0, "the default route");
        let found = attributes(&bytes, NLMSG_HEADER_BYTES + 12);
        assert_eq!(found[0], (RTA_GATEWAY, vec![10, 244, 1, 1]));
        assert_eq!(found[1], (RTA_OIF, 3u32.to_ne_bytes().to_vec()));
    }

    fn error_reply(sequence: u32, code: i32) -> Vec<u8> {
        let mut reply = vec![0; NLMSG_HEADER_BYTES + 4];
        let length = u32::try_from(reply.len()).expect("a short reply");
        reply[0..4].copy_from_slice(&length.to_ne_bytes());
        reply[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        reply[8..12].copy_from_slice(&sequence.to_ne_bytes());
        reply[16..20].copy_from_slice(&code.to_ne_bytes());
        reply
    }

    #[test]
    fn the_kernels_answer_is_read_for_our_request_only() {
        assert!(matches!(
            acknowledgement(&error_reply(5, 0), 5),
            Some(Ok(()))
        ));
        let exists = acknowledgement(&error_reply(5, -17), 5)
            .expect("an answer")
            .unwrap_err();
        assert_eq!(exists.raw_os_error(), Some(17));
        assert!(acknowledgement(&error_reply(4, 0), 5).is_none());
        let mut two = error_reply(4, 0);
        two.extend(error_reply(5, -19));
        assert!(matches!(acknowledgement(&two, 5), Some(Err(_))));
        let mut truncated = error_reply(5, 0);
        truncated[0..4].copy_from_slice(&100u32.to_ne_bytes());
        assert!(matches!(acknowledgement(&truncated, 5), Some(Err(_))));
    }
}

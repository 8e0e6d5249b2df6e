//! Network bring-up with classic `ioctl`s: loopback up, a static IPv4 address on the first
//! virtio NIC, and a default route.
//!
//! The defaults match QEMU user networking (guest 10.0.2.15/24, gateway 10.0.2.2), which is how
//! the host launcher reaches the agent (a `hostfwd` to [`worker_api::AGENT_PORT`]); the kernel
//! command line may override them (`guest_agent.ip=A.B.C.D/N`, `guest_agent.gw=A.B.C.D|none`). The interface
//! is the first (by name) non-loopback entry of `/sys/class/net` that is backed by a device, so
//! virtual interfaces a module may create (`sit0`, `tunl0`, ...) are never picked.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use super::PlatformError;

/// Static IPv4 settings for the NIC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// Address of the guest.
    pub address: Ipv4Addr,
    /// Prefix length (0..=32).
    pub prefix_len: u8,
    /// Default gateway, if any.
    pub gateway: Option<Ipv4Addr>,
}

impl Default for NetConfig {
    /// QEMU user networking: 10.0.2.15/24 via 10.0.2.2.
    fn default() -> Self {
        Self {
            address: Ipv4Addr::new(10, 0, 2, 15),
            prefix_len: 24,
            gateway: Some(Ipv4Addr::new(10, 0, 2, 2)),
        }
    }
}

/// Kernel command-line key overriding the guest address (`guest_agent.ip=10.0.2.15/24`).
pub const CMDLINE_IP: &str = "guest_agent.ip";
/// Kernel command-line key overriding the gateway (`guest_agent.gw=10.0.2.2`, or `none`).
pub const CMDLINE_GW: &str = "guest_agent.gw";

/// The network settings: [`NetConfig::default`] unless the kernel command line (which is measured
/// into RTMR2) says otherwise with [`CMDLINE_IP`] / [`CMDLINE_GW`].
pub fn config_from_cmdline(cmdline: &str) -> Result<NetConfig, PlatformError> {
    let mut config = NetConfig::default();
    for word in cmdline.split_whitespace() {
        let Some((key, value)) = word.split_once('=') else {
            continue;
        };
        if key == CMDLINE_IP {
            let (address, prefix_len) = parse_cidr(value).map_err(|e| {
                PlatformError::Invalid(format!("kernel command line {CMDLINE_IP}: {e}"))
            })?;
            config.address = address;
            config.prefix_len = prefix_len;
        } else if key == CMDLINE_GW {
            config.gateway = if value == "none" {
                None
            } else {
                Some(value.parse().map_err(|_| {
                    PlatformError::Invalid(format!(
                        "kernel command line {CMDLINE_GW}={value:?} is neither an IPv4 address                          nor `none`"
                    ))
                })?)
            };
        }
    }
    Ok(config)
}

/// Parses `A.B.C.D/N`.
pub fn parse_cidr(text: &str) -> Result<(Ipv4Addr, u8), PlatformError> {
    let bad = || PlatformError::Invalid(format!("{text:?} is not an IPv4 CIDR like 10.0.2.15/24"));
    let (addr, len) = text.split_once('/').ok_or_else(bad)?;
    let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
    let len: u8 = len.parse().map_err(|_| bad())?;
    if len > 32 {
        return Err(bad());
    }
    Ok((addr, len))
}

/// The netmask for a prefix length (`24` → 255.255.255.0).
pub fn netmask(prefix_len: u8) -> Ipv4Addr {
    let bits = match prefix_len {
        0 => 0,
        n if n >= 32 => u32::MAX,
        n => u32::MAX << (32 - u32::from(n)),
    };
    Ipv4Addr::from(bits)
}

/// One entry of `/sys/class/net`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    /// Interface name (`eth0`, `enp0s2`, `lo`).
    pub name: String,
    /// Whether it is backed by a device (`/sys/class/net/<name>/device` exists).
    pub has_device: bool,
}

/// Picks the NIC to configure: the first by name that is not `lo` and is backed by a device.
pub fn choose_interface(interfaces: &[Interface]) -> Option<String> {
    let mut candidates: Vec<&Interface> = interfaces
        .iter()
        .filter(|i| i.name != "lo" && i.has_device)
        .collect();
    candidates.sort_by(|a, b| a.name.cmp(&b.name));
    candidates.first().map(|i| i.name.clone())
}

/// Lists `/sys/class/net` (or a fake copy of it).
pub fn list_interfaces(sys_class_net: &Path) -> std::io::Result<Vec<Interface>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(sys_class_net)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let has_device = entry.path().join("device").exists();
        out.push(Interface { name, has_device });
    }
    Ok(out)
}

/// Waits up to `timeout` for a NIC to appear (drivers probe while their module loads, but a
/// device may register a moment later).
pub fn wait_for_interface(
    sys_class_net: &Path,
    timeout: Duration,
) -> Result<String, PlatformError> {
    let start = Instant::now();
    loop {
        let found = list_interfaces(sys_class_net).map_err(|source| PlatformError::Os {
            what: format!("list {}", sys_class_net.display()),
            source,
        })?;
        if let Some(name) = choose_interface(&found) {
            return Ok(name);
        }
        if start.elapsed() >= timeout {
            let names: Vec<_> = found.iter().map(|i| i.name.as_str()).collect();
            return Err(PlatformError::Invalid(format!(
                "no network interface appeared within {} s (found: {names:?}); the VM needs a \
                 virtio-net device and virtio_net.ko must be in /etc/worker-image/modules.list",
                timeout.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An `ifreq` for interface `name` (validated: 1..=15 bytes, no NUL or `/`).
pub fn ifreq_for(name: &str) -> Result<libc::ifreq, PlatformError> {
    if name.is_empty()
        || name.len() >= libc::IFNAMSIZ
        || name
            .bytes()
            .any(|b| b == 0 || b == b'/' || b.is_ascii_whitespace())
    {
        return Err(PlatformError::Invalid(format!(
            "{name:?} is not a valid interface name (1 to {} bytes, no NUL, '/' or spaces)",
            libc::IFNAMSIZ - 1
        )));
    }
    // SAFETY: ifreq is a plain C struct/union of integers, arrays and a pointer; all-zero bytes
    // are a valid value for every member.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(req)
}

/// An IPv4 `sockaddr` (`AF_INET`, port 0) for `addr`.
pub fn sockaddr_v4(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are both 16-byte plain C structs (transmute checks the
    // size); the kernel reads an AF_INET sockaddr exactly as this layout.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// A datagram socket to issue interface ioctls on.
fn control_socket() -> Result<OwnedFd, PlatformError> {
    // SAFETY: plain socket(2) call with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(PlatformError::last_os("open an AF_INET control socket"));
    }
    // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Issues one interface ioctl.
fn ifreq_ioctl(
    sock: &OwnedFd,
    request: libc::c_ulong,
    req: &mut libc::ifreq,
    what: impl FnOnce() -> String,
) -> Result<(), PlatformError> {
    // SAFETY: `req` is a valid, writable ifreq for the whole call and `request` is one of the
    // SIOC[GS]IF* requests, which read/write only that struct.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), request as _, req as *mut libc::ifreq) };
    if rc < 0 {
        return Err(PlatformError::last_os(what()));
    }
    Ok(())
}

/// Sets `IFF_UP | IFF_RUNNING` on interface `name`.
pub fn bring_up(name: &str) -> Result<(), PlatformError> {
    let sock = control_socket()?;
    let mut req = ifreq_for(name)?;
    ifreq_ioctl(&sock, libc::SIOCGIFFLAGS, &mut req, || {
        format!("read flags of {name} (SIOCGIFFLAGS)")
    })?;
    // SAFETY: SIOCGIFFLAGS filled the `ifru_flags` member of the union.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    req.ifr_ifru.ifru_flags = flags | (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    ifreq_ioctl(&sock, libc::SIOCSIFFLAGS, &mut req, || {
        format!("bring {name} up (SIOCSIFFLAGS)")
    })
}

/// Assigns `address/prefix_len` to interface `name`.
pub fn set_ipv4(name: &str, address: Ipv4Addr, prefix_len: u8) -> Result<(), PlatformError> {
    let sock = control_socket()?;
    let mut req = ifreq_for(name)?;
    req.ifr_ifru.ifru_addr = sockaddr_v4(address);
    ifreq_ioctl(&sock, libc::SIOCSIFADDR, &mut req, || {
        format!("set address {address} on {name} (SIOCSIFADDR)")
    })?;
    let mask = netmask(prefix_len);
    let mut req = ifreq_for(name)?;
    req.ifr_ifru.ifru_netmask = sockaddr_v4(mask);
    ifreq_ioctl(&sock, libc::SIOCSIFNETMASK, &mut req, || {
        format!("set netmask {mask} on {name} (SIOCSIFNETMASK)")
    })
}

/// Adds the default route via `gateway` (an existing identical route is fine).
pub fn add_default_route(gateway: Ipv4Addr) -> Result<(), PlatformError> {
    let sock = control_socket()?;
    // SAFETY: rtentry is a plain C struct of integers, sockaddrs and pointers; all-zero is valid
    // (null rt_dev lets the kernel pick the interface from the gateway).
    let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
    rt.rt_dst = sockaddr_v4(Ipv4Addr::UNSPECIFIED);
    rt.rt_genmask = sockaddr_v4(Ipv4Addr::UNSPECIFIED);
    rt.rt_gateway = sockaddr_v4(gateway);
    rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    // SAFETY: `rt` is a valid rtentry for the whole call; SIOCADDRT only reads it.
    let rc = unsafe {
        libc::ioctl(
            sock.as_raw_fd(),
            libc::SIOCADDRT as _,
            &mut rt as *mut libc::rtentry,
        )
    };
    if rc < 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EEXIST) {
            return Ok(());
        }
        return Err(PlatformError::Os {
            what: format!("add default route via {gateway} (SIOCADDRT)"),
            source: err,
        });
    }
    Ok(())
}

/// What [`configure`] set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetReport {
    /// The configured NIC.
    pub interface: String,
    /// Its settings.
    pub config: NetConfig,
}

/// Brings up `lo`, waits for the NIC, configures it and the default route.
pub fn configure(
    sys_class_net: &Path,
    config: &NetConfig,
    wait: Duration,
) -> Result<NetReport, PlatformError> {
    bring_up("lo")?;
    let interface = wait_for_interface(sys_class_net, wait)?;
    set_ipv4(&interface, config.address, config.prefix_len)?;
    bring_up(&interface)?;
    if let Some(gw) = config.gateway {
        add_default_route(gw)?;
    }
    Ok(NetReport {
        interface,
        config: config.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(name: &str, has_device: bool) -> Interface {
        Interface {
            name: name.into(),
            has_device,
        }
    }

    #[test]
    fn cidr_and_netmask() {
        assert_eq!(
            parse_cidr("10.0.2.15/24").expect("cidr"),
            (Ipv4Addr::new(10, 0, 2, 15), 24)
        );
        assert!(parse_cidr("10.0.2.15").is_err());
        assert!(parse_cidr("10.0.2.15/33").is_err());
        assert!(parse_cidr("10.0.2/24").is_err());
        assert_eq!(netmask(24), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(netmask(0), Ipv4Addr::new(0, 0, 0, 0));
        assert_eq!(netmask(32), Ipv4Addr::new(255, 255, 255, 255));
        assert_eq!(netmask(20), Ipv4Addr::new(255, 255, 240, 0));
    }

    #[test]
    fn cmdline_overrides_the_defaults() {
        let plain = "console=ttyS0 panic=-1 oops=panic loglevel=4";
        assert_eq!(
            config_from_cmdline(plain).expect("plain"),
            NetConfig::default()
        );
        let c =
            config_from_cmdline("console=ttyS0 guest_agent.ip=192.168.7.2/16 guest_agent.gw=none")
                .expect("override");
        assert_eq!(c.address, Ipv4Addr::new(192, 168, 7, 2));
        assert_eq!(c.prefix_len, 16);
        assert_eq!(c.gateway, None);
        let c = config_from_cmdline("guest_agent.gw=192.168.7.1").expect("gw");
        assert_eq!(c.gateway, Some(Ipv4Addr::new(192, 168, 7, 1)));
        assert_eq!(c.address, NetConfig::default().address);
        let err = config_from_cmdline("guest_agent.ip=10.0.2.15").expect_err("no prefix");
        assert!(err.to_string().contains("guest_agent.ip"), "{err}");
        let err = config_from_cmdline("guest_agent.gw=gateway").expect_err("bad gw");
        assert!(err.to_string().contains("none"), "{err}");
    }

    #[test]
    fn default_config_is_qemu_user_net() {
        let c = NetConfig::default();
        assert_eq!(c.address, Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(c.prefix_len, 24);
        assert_eq!(c.gateway, Some(Ipv4Addr::new(10, 0, 2, 2)));
    }

    #[test]
    fn interface_choice_skips_lo_and_virtual_ones() {
        assert_eq!(
            choose_interface(&[
                iface("lo", false),
                iface("sit0", false),
                iface("eth0", true)
            ]),
            Some("eth0".into())
        );
        assert_eq!(
            choose_interface(&[
                iface("enp0s3", true),
                iface("enp0s2", true),
                iface("lo", false)
            ]),
            Some("enp0s2".into())
        );
        assert_eq!(choose_interface(&[iface("lo", false)]), None);
        assert_eq!(choose_interface(&[]), None);
    }

    #[test]
    fn interfaces_listed_from_a_fake_sysfs() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("lo")).expect("mkdir");
        std::fs::create_dir_all(dir.path().join("eth0/device")).expect("mkdir");
        let mut found = list_interfaces(dir.path()).expect("list");
        found.sort_by(|a, b| a.name.cmp(&b.name));
        assert_eq!(found, vec![iface("eth0", true), iface("lo", false)]);
        assert_eq!(
            wait_for_interface(dir.path(), Duration::ZERO).expect("found"),
            "eth0"
        );
    }

    #[test]
    fn waiting_for_a_missing_nic_says_what_to_fix() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("lo")).expect("mkdir");
        let err = wait_for_interface(dir.path(), Duration::from_millis(30)).expect_err("none");
        let text = err.to_string();
        assert!(text.contains("virtio_net"), "{text}");
        assert!(text.contains("\"lo\""), "{text}");
    }

    #[test]
    fn ifreq_name_is_validated_and_nul_terminated() {
        let req = ifreq_for("eth0").expect("ifreq");
        assert_eq!(
            req.ifr_name[..5],
            [b'e' as libc::c_char, b't' as _, b'h' as _, b'0' as _, 0]
        );
        assert!(ifreq_for("").is_err());
        assert!(ifreq_for("a-very-long-interface").is_err());
        assert!(ifreq_for("eth/0").is_err());
    }

    #[test]
    fn sockaddr_is_network_order_inet() {
        let sa = sockaddr_v4(Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(sa.sa_family, libc::AF_INET as libc::sa_family_t);
        // sa_data: 2 bytes of port, then the address in network byte order.
        let data: Vec<u8> = sa.sa_data.iter().map(|&b| b as u8).collect();
        assert_eq!(&data[..6], &[0, 0, 10, 0, 2, 15]);
    }

    #[test]
    fn bringing_up_a_missing_interface_names_it() {
        let err = bring_up("nosuchif0").expect_err("no such interface");
        assert!(err.to_string().contains("nosuchif0"), "{err}");
    }
}

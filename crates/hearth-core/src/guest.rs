//! Turning an image's OCI config plus the user's overrides into what hearth-init runs.

use hearth_types::guest::{is_init_system, volume_serial, GUEST_CONFIG_VERSION};
use hearth_types::net::{
    BRIDGE_GATEWAY, BRIDGE_PREFIX, USER_NET_ADDRESS, USER_NET_DNS, USER_NET_GATEWAY,
    USER_NET_PREFIX,
};
use hearth_types::{
    Card, GuestCard, GuestConfig, GuestNetwork, GuestProcess, GuestVolume, ImageConfig,
    NetworkMode, VmSpec,
};

/// PATH given to a workload whose image sets none.
pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Why no process could be derived.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GuestConfigError {
    #[error("image {0} has no ENTRYPOINT or CMD: give a command after the image name")]
    NoCommand(String),
}

/// The argv docker would run: ENTRYPOINT + CMD, where `--entrypoint` replaces ENTRYPOINT and
/// drops the image CMD, and a command line replaces CMD.
pub fn argv(spec: &VmSpec, image: &ImageConfig) -> Vec<String> {
    let (entrypoint, image_cmd) = match &spec.entrypoint {
        Some(ep) => (ep.clone(), Vec::new()),
        None => (image.entrypoint.clone(), image.cmd.clone()),
    };
    let cmd = if spec.command.is_empty() { image_cmd } else { spec.command.clone() };
    entrypoint.into_iter().chain(cmd).collect()
}

/// Image ENV with `-e` entries merged over it (same key replaces, in place).
pub fn merge_env(image: &[String], overrides: &[String]) -> Vec<String> {
    let key = |e: &str| e.split_once('=').map_or(e, |(k, _)| k).to_owned();
    let mut out: Vec<String> = image.to_vec();
    if !out.iter().any(|e| key(e) == "PATH") {
        out.insert(0, DEFAULT_PATH.to_owned());
    }
    for o in overrides {
        let k = key(o);
        match out.iter_mut().find(|e| key(e) == k) {
            Some(slot) => *slot = o.clone(),
            None => out.push(o.clone()),
        }
    }
    out
}

/// The full guest config for a VM.
pub fn guest_config(spec: &VmSpec, image: &ImageConfig) -> Result<GuestConfig, GuestConfigError> {
    let args = argv(spec, image);
    if args.is_empty() {
        return Err(GuestConfigError::NoCommand(spec.image.clone()));
    }
    Ok(GuestConfig {
        version: GUEST_CONFIG_VERSION,
        hostname: spec.name.clone(),
        init_system: is_init_system(&args),
        process: GuestProcess {
            args,
            env: merge_env(&image.env, &spec.env),
            cwd: image.working_dir.clone(),
            user: image.user.clone(),
            tty: spec.tty,
            stdin: spec.interactive || spec.tty,
        },
        ssh_authorized_keys: spec.ssh_public_key.iter().map(|k| k.trim().to_owned()).collect(),
        network: guest_network(spec),
        dhcp: (spec.network == NetworkMode::Macvtap && spec.lan.is_none()).then(|| spec.mac()),
        cards: guest_cards(spec),
        cloud_init: spec.cloud_init.clone(),
        volumes: spec
            .volumes
            .iter()
            .enumerate()
            .filter_map(|(i, v)| {
                let mount_point = v.mount_point.clone()?;
                Some(GuestVolume {
                    serial: volume_serial(i),
                    mount_point,
                    read_only: v.read_only,
                    share: v.source.is_share(),
                })
            })
            .collect(),
    })
}

/// The first card's settings, as the guest configures them.
pub fn guest_network(spec: &VmSpec) -> Option<GuestNetwork> {
    spec.cards().first().and_then(card_network)
}

/// A card's static settings; `None` for a card that takes DHCP on the LAN (`GuestConfig::dhcp`,
/// [`GuestCard`] without a network).
pub fn card_network(card: &Card) -> Option<GuestNetwork> {
    let mac = card.mac.clone();
    match card.network {
        NetworkMode::None => None,
        NetworkMode::User => Some(GuestNetwork {
            mac,
            address: USER_NET_ADDRESS.to_owned(),
            prefix: USER_NET_PREFIX,
            gateway: USER_NET_GATEWAY.to_owned(),
            dns: vec![USER_NET_DNS.to_owned()],
        }),
        NetworkMode::Macvtap => card.lan.as_ref().map(|l| GuestNetwork {
            mac,
            address: l.address.to_string(),
            prefix: l.prefix,
            gateway: l.gateway.map(|g| g.to_string()).unwrap_or_default(),
            dns: l.dns.iter().map(ToString::to_string).collect(),
        }),
        // The resolvers are the host's; the daemon adds them when it writes the config. The
        // default route is the first card's: a later card on the bridge has none.
        NetworkMode::Bridge => card.address.map(|a| GuestNetwork {
            mac,
            address: a.to_string(),
            prefix: BRIDGE_PREFIX,
            gateway: if card.index == 0 { BRIDGE_GATEWAY.to_string() } else { String::new() },
            dns: vec![],
        }),
    }
}

/// The cards after the first, as hearth-init configures them.
pub(crate) fn guest_cards(spec: &VmSpec) -> Vec<GuestCard> {
    (spec.cards().iter().skip(1))
        .map(|c| GuestCard { mac: c.mac.clone(), network: card_network(c) })
        .collect()
}

/// A card in cloud-init's network-config: the name it is given, its MAC, and its static
/// settings (DHCP without them).
#[derive(Debug)]
pub struct CloudInitCard<'a> {
    pub device: &'a str,
    pub mac: &'a str,
    pub network: Option<&'a GuestNetwork>,
}

/// cloud-init's network-config (version 2) for the cards hearth-init configures: each matched by
/// MAC and renamed to its device name, with the same static address, gateway and resolvers, or
/// DHCP on the LAN.
pub fn cloud_init_network_config(cards: &[CloudInitCard<'_>]) -> String {
    let mut s = String::from("version: 2\nethernets:\n");
    for c in cards {
        let device = c.device;
        s.push_str(&format!(
            "  {device}:\n    match:\n      macaddress: \"{}\"\n    set-name: {device}\n",
            c.mac
        ));
        let Some(net) = c.network else {
            s.push_str("    dhcp4: true\n");
            continue;
        };
        s.push_str(&format!("    addresses: [\"{}/{}\"]\n", net.address, net.prefix));
        if !net.gateway.is_empty() {
            s.push_str(&format!(
                "    routes:\n      - to: default\n        via: {}\n",
                net.gateway
            ));
        }
        if !net.dns.is_empty() {
            s.push_str(&format!("    nameservers:\n      addresses: [{}]\n", net.dns.join(", ")));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(entrypoint: Option<Vec<&str>>, command: Vec<&str>) -> VmSpec {
        VmSpec {
            name: "web".into(),
            entrypoint: entrypoint.map(|v| v.into_iter().map(String::from).collect()),
            command: command.into_iter().map(String::from).collect(),
            env: vec!["B=2".into(), "C=3".into()],
            ..hearth_testkit::spec(1)
        }
    }

    fn image() -> ImageConfig {
        ImageConfig {
            entrypoint: vec!["/entry".into()],
            cmd: vec!["default".into()],
            env: vec!["PATH=/bin".into(), "B=1".into()],
            working_dir: "/work".into(),
            user: "app".into(),
            labels: Default::default(),
        }
    }

    #[test]
    fn network_config_matches_the_card_and_repeats_its_settings() {
        let net = GuestNetwork {
            mac: "02:00:00:00:00:07".into(),
            address: "10.61.0.9".into(),
            prefix: 16,
            gateway: "10.61.0.1".into(),
            dns: vec!["192.0.2.53".into()],
        };
        let card = |network| CloudInitCard { device: "eth1", mac: &net.mac, network };
        let text = cloud_init_network_config(&[card(Some(&net))]);
        for needle in [
            "version: 2",
            "  eth1:",
            "macaddress: \"02:00:00:00:00:07\"",
            "set-name: eth1",
            "addresses: [\"10.61.0.9/16\"]",
            "via: 10.61.0.1",
            "addresses: [192.0.2.53]",
        ] {
            assert!(text.contains(needle), "{needle} in\n{text}");
        }
        let quiet = GuestNetwork { dns: vec![], ..net.clone() };
        assert!(!cloud_init_network_config(&[card(Some(&quiet))]).contains("nameservers"));
        let dhcp = cloud_init_network_config(&[card(None)]);
        for needle in
            ["  eth1:", "macaddress: \"02:00:00:00:00:07\"", "set-name: eth1", "dhcp4: true"]
        {
            assert!(dhcp.contains(needle), "{needle} in\n{dhcp}");
        }
    }

    #[test]
    fn a_card_on_the_lan_takes_dhcp_from_hearth_init_or_the_images_own_client() {
        let mut s = spec(None, vec![]);
        s.network = NetworkMode::Macvtap;
        s.macvtap_parent = Some("eth0".into());
        assert_eq!(guest_network(&s), None);
        let cfg = guest_config(&s, &ImageConfig { cmd: vec!["sh".into()], ..Default::default() })
            .expect("config");
        assert_eq!(cfg.dhcp, Some(s.mac()), "hearth-init runs DHCP on the VM's card");
        s.cloud_init_network = Some("eth1".into());
        let files = crate::cloud_init_bundle(&s, vec![]);
        assert!(files["network-config"].to_text_lossy().contains("dhcp4: true"), "{files:?}");
        // A static address there: hearth-init sets it, cloud-init's config says it, and with
        // no gateway there is no default route.
        s.lan = Some(hearth_types::LanAddress::parse("192.168.1.50/24", None, &[]).expect("lan"));
        let net = guest_network(&s).expect("static");
        assert_eq!(
            (net.address.as_str(), net.prefix, net.gateway.as_str()),
            ("192.168.1.50", 24, "")
        );
        let files = crate::cloud_init_bundle(&s, vec![]);
        let config = files["network-config"].to_text_lossy();
        assert!(config.contains("192.168.1.50/24") && !config.contains("routes"), "{config}");
        let cfg = guest_config(&s, &ImageConfig { cmd: vec!["sh".into()], ..Default::default() })
            .expect("config");
        assert_eq!(cfg.dhcp, None, "a static address needs no DHCP");
    }

    #[test]
    fn argv_follows_docker_rules() {
        assert_eq!(argv(&spec(None, vec![]), &image()), ["/entry", "default"]);
        assert_eq!(argv(&spec(None, vec!["x"]), &image()), ["/entry", "x"]);
        assert_eq!(argv(&spec(Some(vec!["sh"]), vec![]), &image()), ["sh"]);
        assert_eq!(argv(&spec(Some(vec!["sh"]), vec!["-c", "id"]), &image()), ["sh", "-c", "id"]);
    }

    #[test]
    fn env_overrides_by_key_and_adds_path() {
        assert_eq!(merge_env(&image().env, &spec(None, vec![]).env), ["PATH=/bin", "B=2", "C=3"]);
        assert_eq!(merge_env(&[], &[]), [DEFAULT_PATH]);
    }

    #[test]
    fn config_carries_image_defaults() {
        let cfg = guest_config(&spec(None, vec![]), &image()).expect("config");
        assert_eq!(cfg.process.cwd, "/work");
        assert_eq!(cfg.process.user, "app");
        assert_eq!(cfg.hostname, "web");
        assert!(!cfg.init_system);
        let none = ImageConfig::default();
        assert!(guest_config(&spec(None, vec![]), &none).is_err());
        assert!(guest_config(&spec(None, vec!["/sbin/init"]), &none).expect("cfg").init_system);
    }

    #[test]
    fn network_and_keys_reach_the_guest() {
        let mut s = spec(None, vec![]);
        s.ssh_public_key = Some("ssh-ed25519 AAAA me\n".into());
        let cfg = guest_config(&s, &image()).expect("config");
        assert_eq!(cfg.ssh_authorized_keys, ["ssh-ed25519 AAAA me"]);
        let net = cfg.network.expect("user networking by default");
        assert_eq!(
            (net.address.as_str(), net.prefix, net.gateway.as_str()),
            ("10.0.2.15", 24, "10.0.2.2")
        );
        assert_eq!(net.mac, hearth_types::net::mac_for(&s.id));
        s.network = NetworkMode::None;
        s.ssh_public_key = None;
        let cfg = guest_config(&s, &image()).expect("config");
        assert!(cfg.network.is_none() && cfg.ssh_authorized_keys.is_empty());
    }
}

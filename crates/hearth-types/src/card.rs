//! A VM's network cards. The first is described by [`VmSpec`]'s own network fields (as it was
//! before a VM could have more); the others ([`VmSpec::nics`]) by a [`NicSpec`] each. Code that
//! deals with every card walks [`VmSpec::cards`], which gives both kinds in one shape.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::net::{mac_for, tap_name};
use crate::vm::{iface_ok, LanAddress, VmSpec, VmSpecError};
use crate::NetworkMode;

/// The most network cards a VM has, its first included (a tap's name, `ht` + 12 hex digits +
/// the card's index, must fit Linux's 15 bytes; a tenth card would need two digits).
pub const MAX_CARDS: usize = 8;

/// A network card after the VM's first (`--network` given again; a Flintlock microVM's second
/// interface on): a tap on the bridge, or a macvtap on a host interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicSpec {
    pub network: NetworkMode,
    /// Derived from the VM's id and the card's index when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Its address on the bridge, allocated at create.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<Ipv4Addr>,
    /// The host interface of a macvtap card.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub macvtap_parent: Option<String>,
    /// A static address on the LAN for a macvtap card; DHCP without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lan: Option<LanAddress>,
    /// The interface's name in cloud-init's generated network-config (Flintlock's
    /// `guest_device_name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_name: Option<String>,
}

impl NicSpec {
    /// A card on `network` with nothing else set.
    pub fn on(network: NetworkMode) -> Self {
        Self {
            network,
            mac: None,
            address: None,
            macvtap_parent: None,
            lan: None,
            guest_name: None,
        }
    }
}

/// One of a VM's network cards, whichever way the spec holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Card {
    /// 0 for the first card; the order the guest sees them in.
    pub index: usize,
    pub network: NetworkMode,
    pub mac: String,
    /// The host link the card is plugged into (a tap or a macvtap), for the cards that have one.
    pub link: String,
    /// Its address on the bridge.
    pub address: Option<Ipv4Addr>,
    pub macvtap_parent: Option<String>,
    pub lan: Option<LanAddress>,
    /// Its name in cloud-init's generated network-config, when one is generated.
    pub guest_name: Option<String>,
}

impl Card {
    /// Whether the host makes a link for it (a tap on the bridge, a macvtap).
    pub fn has_link(&self) -> bool {
        matches!(self.network, NetworkMode::Bridge | NetworkMode::Macvtap)
    }
}

/// The host link of a VM's `index`th card: `ht` and the id's first 12 hex digits, then the
/// index for every card after the first (at most 15 bytes, as IFNAMSIZ allows).
pub fn card_link_name(id: &crate::VmId, index: usize) -> String {
    match index {
        0 => tap_name(id),
        i => format!("{}{i}", tap_name(id)),
    }
}

/// The MAC of a VM's `index`th card when none is given: the first card's derived one with the
/// index in the first octet's high nibble (still unicast and locally administered).
pub fn card_mac(id: &crate::VmId, index: usize) -> String {
    let first = mac_for(id);
    match index {
        0 => first,
        i => format!("{:02x}{}", 0x02 | ((i as u8 & 0x0f) << 4), &first[2..]),
    }
}

/// The VM a host link belongs to, by its name: the `ht` + 12 hex digits stem of a card's link,
/// whatever its index. `None` for a name hearth never gives a link.
pub fn link_stem(name: &str) -> Option<&str> {
    let hex = |s: &str| s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    let stem = name.get(..14)?;
    let index = &name[14..];
    let ok = stem.starts_with("ht")
        && hex(&stem[2..])
        && (index.is_empty() || (index.len() == 1 && (b'1'..=b'7').contains(&index.as_bytes()[0])));
    ok.then_some(stem)
}

impl VmSpec {
    /// Every network card, the first one first; none with `--network none`.
    pub fn cards(&self) -> Vec<Card> {
        if self.network == NetworkMode::None {
            return vec![];
        }
        let first = Card {
            index: 0,
            network: self.network,
            mac: self.mac(),
            link: card_link_name(&self.id, 0),
            address: self.address,
            macvtap_parent: self.macvtap_parent.clone(),
            lan: self.lan.clone(),
            guest_name: self.cloud_init_network.clone(),
        };
        let rest = self.nics.iter().enumerate().map(|(i, n)| Card {
            index: i + 1,
            network: n.network,
            mac: n.mac.clone().unwrap_or_else(|| card_mac(&self.id, i + 1)),
            link: card_link_name(&self.id, i + 1),
            address: n.address,
            macvtap_parent: n.macvtap_parent.clone(),
            lan: n.lan.clone(),
            guest_name: n.guest_name.clone(),
        });
        std::iter::once(first).chain(rest).collect()
    }

    /// The addresses its cards hold on the bridge.
    pub fn bridge_addresses(&self) -> Vec<Ipv4Addr> {
        self.cards().into_iter().filter_map(|c| c.address).collect()
    }

    /// Checks the cards after the first, and that no two cards share a MAC.
    pub(crate) fn validate_nics(&self) -> Result<(), VmSpecError> {
        let bad = |m: String| Err(VmSpecError::Card(m));
        if self.nics.is_empty() {
            return Ok(());
        }
        if self.network == NetworkMode::None {
            return bad("--network none cannot be combined with more network cards".into());
        }
        if self.nics.len() >= MAX_CARDS {
            return bad(format!("a VM has at most {MAX_CARDS} network cards"));
        }
        for (i, n) in self.nics.iter().enumerate() {
            let which = format!("network card {}", i + 2);
            match n.network {
                NetworkMode::Bridge if n.macvtap_parent.is_none() && n.lan.is_none() => {}
                NetworkMode::Macvtap if n.address.is_none() => {
                    if !n.macvtap_parent.as_deref().is_some_and(iface_ok) {
                        return bad(format!(
                            "{which}: a macvtap card needs the host interface it sits on (macvtap:IFACE), got {:?}",
                            n.macvtap_parent.as_deref().unwrap_or_default()
                        ));
                    }
                }
                NetworkMode::Bridge | NetworkMode::Macvtap => {
                    return bad(format!("{which}: a bridge address goes with a bridge card, a LAN address and host interface with a macvtap card"));
                }
                other => {
                    return bad(format!(
                        "{which} is {other}: cards after the first are bridge or macvtap[:IFACE]"
                    ))
                }
            }
            if let Some(mac) = &n.mac {
                crate::net::validate_mac(mac)?;
            }
            if let Some(name) = n.guest_name.as_deref().filter(|g| !iface_ok(g)) {
                return Err(VmSpecError::InterfaceName(name.to_owned()));
            }
        }
        let cards = self.cards();
        for (i, c) in cards.iter().enumerate() {
            if let Some(o) = cards[..i].iter().find(|o| o.mac.eq_ignore_ascii_case(&c.mac)) {
                return bad(format!(
                    "network cards {} and {} both have MAC {}: give each its own",
                    o.index + 1,
                    c.index + 1,
                    c.mac
                ));
            }
            let named = c.guest_name.is_some();
            if named && cards[..i].iter().any(|o| o.guest_name == c.guest_name) {
                return bad(format!(
                    "two network cards are named {:?} in the guest: give each its own name",
                    c.guest_name.as_deref().unwrap_or_default()
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_cards() -> VmSpec {
        let mut s = crate::vm::tests::spec();
        s.network = NetworkMode::Bridge;
        s.nics = vec![NicSpec::on(NetworkMode::Bridge)];
        s
    }

    #[test]
    fn cards_after_the_first_get_their_own_link_and_mac() {
        let s = two_cards();
        s.validate().expect("valid");
        let cards = s.cards();
        assert_eq!(cards.len(), 2);
        assert_eq!(cards[0].link.len(), 14);
        assert_eq!(cards[1].link, format!("{}1", cards[0].link));
        assert!(cards[1].link.len() <= 15);
        assert_ne!(cards[0].mac, cards[1].mac);
        crate::net::validate_mac(&cards[1].mac).expect("a unicast MAC");
        assert_eq!(cards[1].mac[2..], cards[0].mac[2..]);
        // The last card's link still fits IFNAMSIZ.
        assert_eq!(card_link_name(&s.id, MAX_CARDS - 1).len(), 15);
    }

    #[test]
    fn links_are_told_apart_by_their_stem() {
        let s = two_cards();
        let cards = s.cards();
        assert_eq!(link_stem(&cards[0].link), Some(cards[0].link.as_str()));
        assert_eq!(link_stem(&cards[1].link), Some(cards[0].link.as_str()));
        for other in ["eth0", "ht0123", "htZZZZZZZZZZZZ", "ht0123456789ab8", "ht0123456789ab12"] {
            assert_eq!(link_stem(other), None, "{other}");
        }
    }

    #[test]
    fn a_vm_without_network_has_no_cards_and_takes_no_extra_one() {
        let mut s = two_cards();
        s.network = NetworkMode::None;
        assert!(s.cards().is_empty());
        assert!(matches!(s.validate(), Err(VmSpecError::Card(m)) if m.contains("--network none")));
    }

    #[test]
    fn extra_cards_are_bridge_or_macvtap_with_distinct_macs() {
        let mut s = two_cards();
        s.nics[0].network = NetworkMode::User;
        assert!(
            matches!(s.validate(), Err(VmSpecError::Card(m)) if m.contains("bridge or macvtap"))
        );
        s.nics[0].network = NetworkMode::Macvtap;
        assert!(matches!(s.validate(), Err(VmSpecError::Card(m)) if m.contains("macvtap:IFACE")));
        s.nics[0].macvtap_parent = Some("eth0".into());
        s.validate().expect("a macvtap card");
        s.nics[0].mac = Some(s.mac().to_uppercase());
        assert!(matches!(s.validate(), Err(VmSpecError::Card(m)) if m.contains("both have MAC")));
        s.nics[0].mac = Some("01:00:00:00:00:01".into());
        assert!(s.validate().is_err(), "multicast");
        s.nics = vec![NicSpec::on(NetworkMode::Bridge); MAX_CARDS];
        assert!(matches!(s.validate(), Err(VmSpecError::Card(m)) if m.contains("at most")));
    }
}

//! The in-memory index of VM names, ids and bridge addresses, rebuilt from the records at start
//! and kept by every save and removal, so a create or a lookup costs the same with 10,000 VMs as
//! with 10 (no listing of every record).

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;

use hearth_types::{VmId, VmRecord, VmSpec};

use crate::Error;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    name: String,
    addresses: Vec<Ipv4Addr>,
}

/// Names, ids and addresses of the stored VMs.
#[derive(Debug, Default)]
pub struct VmIndex {
    /// By id, ordered, so an id prefix is a range.
    ids: BTreeMap<String, Entry>,
    names: HashMap<String, VmId>,
    addresses: HashMap<Ipv4Addr, VmId>,
}

impl VmIndex {
    pub fn rebuild(records: &[VmRecord]) -> Self {
        let mut ix = Self::default();
        for r in records {
            ix.upsert(&r.spec);
        }
        ix
    }

    /// Records a saved VM (its name and address may have changed).
    pub fn upsert(&mut self, spec: &VmSpec) {
        self.remove(&spec.id);
        self.names.insert(spec.name.clone(), spec.id.clone());
        let addresses = spec.bridge_addresses();
        for a in &addresses {
            self.addresses.insert(*a, spec.id.clone());
        }
        self.ids.insert(spec.id.as_str().to_owned(), Entry { name: spec.name.clone(), addresses });
    }

    pub fn remove(&mut self, id: &VmId) {
        if let Some(e) = self.ids.remove(id.as_str()) {
            if self.names.get(&e.name) == Some(id) {
                self.names.remove(&e.name);
            }
            for a in e.addresses {
                if self.addresses.get(&a) == Some(id) {
                    self.addresses.remove(&a);
                }
            }
        }
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The VM of this name.
    pub fn by_name(&self, name: &str) -> Option<&VmId> {
        self.names.get(name)
    }

    /// The VM holding this bridge address, by name.
    pub fn address_holder(&self, a: Ipv4Addr) -> Option<&str> {
        let id = self.addresses.get(&a)?;
        self.ids.get(id.as_str()).map(|e| e.name.as_str())
    }

    /// Every bridge address in use.
    pub fn addresses(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        self.addresses.keys().copied()
    }

    /// The VM a user means: an exact name, an exact id, or the only id with this prefix.
    pub fn resolve(&self, reference: &str) -> Result<VmId, Error> {
        if reference.is_empty() {
            return Err(Error::invalid("no VM given: name a VM by its name or id"));
        }
        if let Some(id) = self.names.get(reference) {
            return Ok(id.clone());
        }
        let matches: Vec<&String> = self
            .ids
            .range(reference.to_owned()..)
            .map(|(id, _)| id)
            .take_while(|id| id.starts_with(reference))
            .take(6)
            .collect();
        match matches.as_slice() {
            [one] => one.parse::<VmId>().map_err(Error::internal),
            [] => Err(Error::not_found(format!("no such VM: {reference} (see `hearth ps -a`)"))),
            many => Err(Error::precondition(format!(
                "{reference} matches {}{} VMs ({}); give more of the id",
                if many.len() > 5 { "more than " } else { "" },
                many.len().min(5),
                many.iter().take(5).map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(n: u8, name: &str, address: Option<Ipv4Addr>) -> VmSpec {
        VmSpec { name: name.into(), address, ..hearth_testkit::spec(n) }
    }

    #[test]
    fn names_ids_and_prefixes_resolve_and_follow_changes() {
        let mut ix = VmIndex::default();
        let (a, b) = (spec(0x11, "web", Some(Ipv4Addr::new(10, 61, 0, 2))), spec(0x12, "db", None));
        ix.upsert(&a);
        ix.upsert(&b);
        assert_eq!(ix.resolve("web").expect("name"), a.id);
        assert_eq!(ix.resolve(a.id.as_str()).expect("id"), a.id);
        assert_eq!(ix.resolve("1212").expect("prefix"), b.id);
        let e = ix.resolve("1").expect_err("two match");
        assert!(e.message.contains("matches 2 VMs") && e.message.contains(a.id.as_str()), "{e}");
        assert_eq!(ix.resolve("zz").expect_err("none").kind, crate::ErrorKind::NotFound);
        assert_eq!(ix.address_holder(Ipv4Addr::new(10, 61, 0, 2)), Some("web"));
        // A rename (a saved record with a new name) and a removal are followed.
        ix.upsert(&spec(0x11, "www", None));
        assert!(ix.by_name("web").is_none() && ix.by_name("www") == Some(&a.id));
        assert_eq!(ix.addresses().count(), 0);
        ix.remove(&b.id);
        assert_eq!(ix.resolve("db").expect_err("gone").kind, crate::ErrorKind::NotFound);
        assert_eq!(ix.len(), 1);
    }

    #[test]
    fn a_prefix_of_many_ids_names_only_a_few() {
        let records: Vec<VmRecord> = (0..50u8)
            .map(|n| {
                let mut r = hearth_testkit::record(
                    n,
                    hearth_types::Desired::Stopped,
                    hearth_types::VmState::Created,
                );
                r.spec.name = format!("v{n}");
                r
            })
            .collect();
        let ix = VmIndex::rebuild(&records);
        let e = ix.resolve("0").expect_err("many");
        assert!(e.message.contains("more than 5"), "{e}");
    }
}

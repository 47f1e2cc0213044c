//! `CreateVm`: the wire request, validated into the core's command (hearth-api's `TryFrom`), then
//! the core's create use-case.

use std::sync::Arc;

use hearth_api::status::to_status;
use hearth_api::v1 as pb;
use hearth_core::NewVm;
use hearth_types::VmRecord;
use tonic::Status;

use crate::daemon::Daemon;

pub async fn create(d: &Arc<Daemon>, mut req: pb::CreateVmRequest) -> Result<VmRecord, Status> {
    if !req.snapshot.is_empty() {
        if !req.image.is_empty() {
            return Err(Status::invalid_argument(
                "a VM from a snapshot runs the snapshot's image: give --snapshot or an image, not both",
            ));
        }
        let from = hearth_core::FromSnapshot {
            snapshot: req.snapshot,
            name: Some(req.name).filter(|n| !n.is_empty()),
            labels: req.labels.into_iter().collect(),
            kernel: Some(req.kernel).filter(|k| !k.is_empty()),
        };
        return d.reconciler().create_from_snapshot(from).await.map_err(to_status);
    }
    if req.vmm.is_empty() {
        req.vmm = d.default_vmm.to_string();
    }
    let new = new_vm(d, req).map_err(to_status)?;
    d.reconciler().create(new).await.map_err(to_status)
}

/// The core's command for `req`, with the daemon's defaults: a macvtap network with no
/// interface named sits on `--parent-iface`.
pub fn new_vm(d: &Daemon, req: pb::CreateVmRequest) -> Result<NewVm, hearth_core::Error> {
    use hearth_types::NetworkMode::Macvtap;
    let mut new = NewVm::try_from(req)?;
    let parent = || {
        d.parent_iface.clone().ok_or_else(|| {
            hearth_core::Error::invalid(
                "--network macvtap needs the host interface: macvtap:IFACE (e.g. macvtap:eth0), or start hearthd with --parent-iface IFACE",
            )
        })
    };
    if new.network == Macvtap && new.macvtap_parent.is_none() {
        new.macvtap_parent = Some(parent()?);
    }
    for nic in new.nics.iter_mut().filter(|n| n.network == Macvtap && n.macvtap_parent.is_none()) {
        nic.macvtap_parent = Some(parent()?);
    }
    // `-v DIR:PATH` shares the directory, as docker bind-mounts it.
    for v in &mut new.volumes {
        if let hearth_types::VolumeSource::Host { path } = &v.source {
            if std::path::Path::new(path).is_dir() {
                v.source = hearth_types::VolumeSource::Share { path: path.clone() };
            }
        }
    }
    Ok(new)
}

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
    if req.vmm.is_empty() {
        req.vmm = d.default_vmm.to_string();
    }
    let new = NewVm::try_from(req).map_err(to_status)?;
    d.reconciler().create(new).await.map_err(to_status)
}

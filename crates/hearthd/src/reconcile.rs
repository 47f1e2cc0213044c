//! The daemon's face of hearth-core's reconciler: gRPC statuses for its errors.

use std::sync::Arc;

use hearth_api::status::to_status;
pub use hearth_core::{Options, DEFAULT_STOP_TIMEOUT, READY_TIMEOUT};
use hearth_types::{VmId, VmRecord};
use tonic::Status;

use crate::daemon::Daemon;

/// Brings one VM to its desired state, for callers that already hold the VM's lock.
pub async fn reconcile_locked(
    d: &Arc<Daemon>,
    id: &VmId,
    opts: Options,
) -> Result<Option<VmRecord>, Status> {
    d.reconciler().reconcile_locked(id, opts).await.map_err(to_status)
}

/// On daemon start: re-adopt live VMMs, record the ones that died while hearthd was down, and
/// finish half-done work.
pub async fn recover(d: &Arc<Daemon>) {
    d.reconciler().recover().await;
}

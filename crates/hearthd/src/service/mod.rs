//! The `hearth.v1.Hearth` gRPC service: validates requests, persists intent, reconciles.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use hearth_api::v1::{self as pb, hearth_server::Hearth};
use hearth_types::{Desired, ImageRef, VmRecord, VmState};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::daemon::{internal, Daemon};
use hearth_api::status::to_status;
use hearth_core::{Options, DEFAULT_STOP_TIMEOUT, READY_TIMEOUT};

pub type Streamed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The API handlers.
#[derive(Debug, Clone)]
pub struct Api {
    d: Arc<Daemon>,
}

impl Api {
    pub fn new(d: Arc<Daemon>) -> Self {
        Self { d }
    }
}

mod kernel_image;
mod support;

pub use kernel_image::{initrd_from_image, kernel_from_image};
pub use support::detached;
use support::*;

#[tonic::async_trait]
impl Hearth for Api {
    async fn version(
        &self,
        _: Request<pb::Empty>,
    ) -> Result<Response<pb::VersionResponse>, Status> {
        let accel = crate::adapters::default_accel().map(|a| a.to_string()).unwrap_or_else(|e| e);
        Ok(Response::new(pb::VersionResponse {
            version: env!("CARGO_PKG_VERSION").into(),
            root: self.d.root.display().to_string(),
            accel,
        }))
    }

    async fn info(&self, _: Request<pb::Empty>) -> Result<Response<pb::Record>, Status> {
        let d = self.d.clone();
        let info = tokio::task::spawn_blocking(move || crate::adapters::info(&d))
            .await
            .map_err(internal)?
            .map_err(chain)?;
        Ok(Response::new(pb::Record { json: info.to_string(), warning: String::new() }))
    }

    type PullImageStream = Streamed<pb::Progress>;
    async fn pull_image(
        &self,
        req: Request<pb::PullImageRequest>,
    ) -> Result<Response<Self::PullImageStream>, Status> {
        let req = req.into_inner();
        let r: ImageRef = req.r#ref.parse().map_err(user_error)?;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let d = self.d.clone();
        tokio::task::spawn_blocking(move || {
            let out =
                d.images.pull(&r, &d.pull_options(req.insecure), &ChannelProgress(tx.clone()));
            let msg = match out {
                Ok(rec) => {
                    Ok(pb::Progress { done: true, result_json: json(&rec), ..Default::default() })
                }
                Err(e) => Err(chain(e)),
            };
            let _ = tx.blocking_send(msg);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn import_image(
        &self,
        req: Request<pb::ImportImageRequest>,
    ) -> Result<Response<pb::Record>, Status> {
        let req = req.into_inner();
        let name: ImageRef = req.name.parse().map_err(user_error)?;
        let d = self.d.clone();
        let rec = blocking(move || {
            d.images.import(std::path::Path::new(&req.path), &name).map_err(chain)
        })
        .await?;
        Ok(record(&rec))
    }

    async fn list_images(&self, _: Request<pb::Empty>) -> Result<Response<pb::Records>, Status> {
        let list = self.d.images.list().map_err(internal)?;
        Ok(Response::new(pb::Records { json: list.iter().map(json).collect() }))
    }

    async fn remove_image(
        &self,
        req: Request<pb::RemoveRequest>,
    ) -> Result<Response<pb::Record>, Status> {
        let req = req.into_inner();
        let d = self.d.clone();
        let rec = detached(async move {
            d.reconciler().remove_image(&req.r#ref, req.force).await.map_err(to_status)
        })
        .await?;
        Ok(record(&rec))
    }

    async fn import_kernel(
        &self,
        req: Request<pb::ImportKernelRequest>,
    ) -> Result<Response<pb::Record>, Status> {
        let req = req.into_inner();
        hearth_types::validate_name(&req.name).map_err(user_error)?;
        let d = self.d.clone();
        let rec = blocking(move || {
            let modules = (!req.modules.is_empty()).then(|| std::path::PathBuf::from(&req.modules));
            let rec = d
                .kernels
                .import(std::path::Path::new(&req.path), modules.as_deref(), &req.name)
                .map_err(chain)?;
            if req.make_default {
                d.kernels.set_default(&req.name).map_err(chain)?;
            }
            // Build the initramfs now, so the first `run` does not pay for it.
            d.kernels.initramfs(&req.name, &d.init_binary).map_err(chain)?;
            Ok(rec)
        })
        .await?;
        Ok(record(&rec))
    }

    type PullKernelStream = Streamed<pb::Progress>;
    async fn pull_kernel(
        &self,
        req: Request<pb::PullKernelRequest>,
    ) -> Result<Response<Self::PullKernelStream>, Status> {
        let req = req.into_inner();
        let r: ImageRef = req.r#ref.parse().map_err(user_error)?;
        // Named after its reference (`repo:tag`, as `--kernel REF` finds it) unless named.
        let name = if req.name.is_empty() { r.familiar() } else { req.name.clone() };
        let name = hearth_types::kernel_name(&name).map_err(user_error)?;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let d = self.d.clone();
        tokio::task::spawn_blocking(move || {
            let run = || -> anyhow::Result<hearth_types::KernelRecord> {
                let img = d.images.pull(
                    &r,
                    &d.pull_options(req.insecure),
                    &ChannelProgress(tx.clone()),
                )?;
                kernel_from_image(&d, &img, &name, None)
            };
            let msg = match run() {
                Ok(rec) => {
                    Ok(pb::Progress { done: true, result_json: json(&rec), ..Default::default() })
                }
                Err(e) => Err(Status::failed_precondition(format!("{e:#}"))),
            };
            let _ = tx.blocking_send(msg);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn list_kernels(
        &self,
        _: Request<pb::Empty>,
    ) -> Result<Response<pb::KernelList>, Status> {
        let list = self.d.kernels.list().map_err(chain)?;
        let default = self.d.kernels.default_name().map_err(chain)?.unwrap_or_default();
        Ok(Response::new(pb::KernelList { json: list.iter().map(json).collect(), default }))
    }

    async fn remove_kernel(
        &self,
        req: Request<pb::RemoveRequest>,
    ) -> Result<Response<pb::Record>, Status> {
        let req = req.into_inner();
        let d = self.d.clone();
        let rec = detached(async move {
            d.reconciler().remove_kernel(&req.r#ref, req.force).await.map_err(to_status)
        })
        .await?;
        Ok(record(&rec))
    }

    async fn set_default_kernel(
        &self,
        req: Request<pb::Ref>,
    ) -> Result<Response<pb::Empty>, Status> {
        self.d.kernels.set_default(&req.into_inner().r#ref).map_err(chain)?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn create_vm(
        &self,
        req: Request<pb::CreateVmRequest>,
    ) -> Result<Response<pb::Record>, Status> {
        let d = self.d.clone();
        detached(async move { crate::create::create(&d, req.into_inner()).await })
            .await
            .map(|r| record(&r))
    }

    async fn start_vm(
        &self,
        req: Request<pb::StartVmRequest>,
    ) -> Result<Response<pb::Record>, Status> {
        let req = req.into_inner();
        let rec = self.d.resolve(&req.r#ref)?;
        let id = rec.spec.id.clone();
        let mut changes = self.d.subscribe();
        let (d, id2) = (self.d.clone(), id.clone());
        let already = detached(async move {
            d.reconciler().start(&id2).await.map_err(hearth_api::status::to_status)
        })
        .await?;
        if let Some(cur) = already {
            return Ok(record(&cur));
        }
        // The record, or how it ended if it was removed since; removed mid-boot is an error.
        let current = || match self.d.get(&id)? {
            Some(r) => Ok(r),
            None => match self.d.tombstone(&id) {
                Some(t) if t.status.state == VmState::Starting => {
                    Err(Status::aborted(format!("VM {} was removed while it started", t.spec.name)))
                }
                Some(t) => Ok(t),
                None => Err(Status::not_found("VM vanished")),
            },
        };
        let mut out = current()?;
        let warning = out.status.reason.clone();
        if req.wait_ready {
            // Until hearth-init reports ready, or the VM already ended, or was removed.
            loop {
                out = current()?;
                if out.status.state != VmState::Starting {
                    break;
                }
                if tokio::time::timeout(READY_TIMEOUT, changes.changed()).await.is_err() {
                    return Err(Status::deadline_exceeded(
                        "the guest did not report ready in time; see `hearth logs`",
                    ));
                }
            }
        }
        Ok(Response::new(pb::Record {
            json: json(&out),
            warning: if out.status.accel == "tcg" { warning } else { String::new() },
        }))
    }

    async fn stop_vm(
        &self,
        req: Request<pb::StopVmRequest>,
    ) -> Result<Response<pb::Record>, Status> {
        let req = req.into_inner();
        let timeout = if req.timeout_secs == 0 {
            DEFAULT_STOP_TIMEOUT
        } else {
            Duration::from_secs(req.timeout_secs.into())
        };
        self.set_desired(&req.r#ref, Desired::Stopped, Options { stop_timeout: timeout }).await
    }

    async fn kill_vm(
        &self,
        req: Request<pb::KillVmRequest>,
    ) -> Result<Response<pb::Record>, Status> {
        let req = req.into_inner();
        let sig = parse_signal(&req.signal)?;
        let rec = self.d.resolve(&req.r#ref)?;
        if rec.status.pid.is_none() {
            return Err(Status::failed_precondition(format!(
                "VM {} is not running",
                rec.spec.name
            )));
        }
        self.on_vm(rec, move |r, id| async move { r.kill(&id, sig).await }).await
    }

    async fn pause_vm(&self, req: Request<pb::Ref>) -> Result<Response<pb::Record>, Status> {
        let rec = self.d.resolve(&req.into_inner().r#ref)?;
        self.on_vm(rec, |r, id| async move { r.set_paused(&id, true).await.map(Some) }).await
    }

    async fn create_snapshot(
        &self,
        req: Request<pb::CreateSnapshotRequest>,
    ) -> Result<Response<pb::Record>, Status> {
        let req = req.into_inner();
        let rec = self.d.resolve(&req.r#ref)?;
        let snap = self
            .d
            .reconciler()
            .snapshot_create(&rec.spec.id, &req.name)
            .await
            .map_err(to_status)?;
        Ok(record(&snap))
    }

    async fn list_snapshots(
        &self,
        _req: Request<pb::Empty>,
    ) -> Result<Response<pb::Records>, Status> {
        let all = self.d.reconciler().snapshots().map_err(to_status)?;
        Ok(Response::new(pb::Records { json: all.iter().map(json).collect() }))
    }

    async fn remove_snapshot(&self, req: Request<pb::Ref>) -> Result<Response<pb::Empty>, Status> {
        let name = req.into_inner().r#ref;
        self.d.reconciler().snapshot_remove(&name).map_err(to_status)?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn unpause_vm(&self, req: Request<pb::Ref>) -> Result<Response<pb::Record>, Status> {
        let rec = self.d.resolve(&req.into_inner().r#ref)?;
        self.on_vm(rec, |r, id| async move { r.set_paused(&id, false).await.map(Some) }).await
    }

    async fn remove_vm(
        &self,
        req: Request<pb::RemoveRequest>,
    ) -> Result<Response<pb::Record>, Status> {
        let req = req.into_inner();
        let rec = self.d.resolve(&req.r#ref)?;
        if running(&rec) && !req.force {
            return Err(Status::failed_precondition(format!(
                "VM {} is {}: stop it first, or use `hearth rm -f`",
                rec.spec.name, rec.status.state
            )));
        }
        self.set_desired(&req.r#ref, Desired::Deleted, Options::default()).await?;
        Ok(record(&rec))
    }

    async fn list_vms(
        &self,
        req: Request<pb::ListVmsRequest>,
    ) -> Result<Response<pb::Records>, Status> {
        let all = req.into_inner().all;
        let list = self.d.vms.list().map_err(internal)?;
        Ok(Response::new(pb::Records {
            json: list.iter().filter(|r| all || running(r)).map(json).collect(),
        }))
    }

    async fn inspect_vm(&self, req: Request<pb::Ref>) -> Result<Response<pb::Record>, Status> {
        Ok(record(&self.d.resolve(&req.into_inner().r#ref)?))
    }

    async fn wait_vm(&self, req: Request<pb::Ref>) -> Result<Response<pb::WaitResponse>, Status> {
        let reference = req.into_inner().r#ref;
        let rec = match self.d.resolve(&reference) {
            Ok(r) => r,
            Err(e) => self.d.tombstone_by_ref(&reference).ok_or(e)?,
        };
        let id = rec.spec.id.clone();
        let mut changes = self.d.subscribe();
        loop {
            let Some(cur) = self.d.get(&id)? else {
                // Removed: how it ended, if it ended before (an --rm VM), else that it was removed.
                let t =
                    self.d.tombstone(&id).ok_or_else(|| Status::not_found("the VM was removed"))?;
                let ended = t.status.exit_code.is_some();
                return Ok(Response::new(pb::WaitResponse {
                    exit_code: t.status.exit_code.unwrap_or(-1),
                    state: if ended { t.status.state.to_string() } else { "removed".into() },
                    reason: if ended {
                        t.status.reason
                    } else {
                        "it was removed (hearth rm -f) before it stopped".into()
                    },
                }));
            };
            if !running(&cur) && cur.desired != Desired::Running {
                return Ok(Response::new(pb::WaitResponse {
                    exit_code: cur.status.exit_code.unwrap_or(-1),
                    state: cur.status.state.to_string(),
                    reason: cur.status.reason,
                }));
            }
            changes.changed().await.map_err(internal)?;
        }
    }

    type LogsStream = Streamed<pb::Chunk>;
    async fn logs(
        &self,
        req: Request<pb::LogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        let req = req.into_inner();
        let rec = self.d.resolve(&req.r#ref)?;
        let offset = if req.from_boot { rec.status.console_offset } else { 0 };
        let rx = crate::console::stream_logs(self.d.clone(), rec.spec.id, offset, req.follow);
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type AttachStream = Streamed<pb::Chunk>;
    async fn attach(
        &self,
        req: Request<tonic::Streaming<pb::Chunk>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        let mut input = req.into_inner();
        let first = input
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("attach needs the VM named first"))?;
        let rec = self.d.resolve(&first.r#ref)?;
        if !running(&rec) {
            return Err(Status::failed_precondition(format!(
                "VM {} is not running; start it first",
                rec.spec.name
            )));
        }
        let rx = crate::console::attach(self.d.clone(), rec.spec.id, input).await?;
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type ExecStream = Streamed<pb::ExecOutput>;
    async fn exec(
        &self,
        req: Request<tonic::Streaming<pb::ExecInput>>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        let rx = crate::exec::exec(self.d.clone(), req.into_inner()).await?;
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn copy_to(
        &self,
        req: Request<tonic::Streaming<pb::CopyChunk>>,
    ) -> Result<Response<pb::Empty>, Status> {
        crate::exec::copy_to(self.d.clone(), req.into_inner()).await?;
        Ok(Response::new(pb::Empty {}))
    }

    type CopyFromStream = Streamed<pb::CopyChunk>;
    async fn copy_from(
        &self,
        req: Request<pb::CopyFromRequest>,
    ) -> Result<Response<Self::CopyFromStream>, Status> {
        let rx = crate::exec::copy_from(self.d.clone(), req.into_inner()).await?;
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

impl Api {
    /// Persists `desired` for a VM and reconciles it, in a task of the daemon's own.
    pub async fn set_desired(
        &self,
        reference: &str,
        desired: Desired,
        opts: Options,
    ) -> Result<Response<pb::Record>, Status> {
        let rec = self.d.resolve(reference)?;
        self.on_vm(rec, move |r, id| async move { r.set_desired(&id, desired, opts).await }).await
    }

    /// Runs `op` on the reconciler for the VM of `rec`, in a task of the daemon's own (it
    /// outlives a client that goes away); its record after, or `rec` when it is gone.
    async fn on_vm<F, Fut>(&self, rec: VmRecord, op: F) -> Result<Response<pb::Record>, Status>
    where
        F: FnOnce(Arc<hearth_core::Reconciler>, hearth_types::VmId) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = hearth_core::Result<Option<VmRecord>>> + Send + 'static,
    {
        let d = self.d.clone();
        detached(async move {
            let out = op(d.reconciler().clone(), rec.spec.id.clone())
                .await
                .map_err(hearth_api::status::to_status)?;
            Ok(record(&out.unwrap_or(rec)))
        })
        .await
    }
}

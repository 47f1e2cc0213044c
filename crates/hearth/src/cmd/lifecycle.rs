//! `start`, `stop`, `restart`, `kill`, `pause`, `unpause`, `rm`, `wait`: each takes several VMs,
//! like docker.

use clap::Args;
use hearth_api::v1 as pb;

use crate::client;

#[derive(Debug, Args)]
pub struct StartArgs {
    /// Return once the VMM runs, without waiting for the guest to report ready.
    #[arg(long)]
    no_wait: bool,
    #[arg(required = true)]
    vms: Vec<String>,
}

#[derive(Debug, Args)]
pub struct StopArgs {
    /// Seconds to wait for the guest to stop before killing it.
    #[arg(short = 't', long = "time", default_value_t = 10)]
    time: u32,
    #[arg(required = true)]
    vms: Vec<String>,
}

#[derive(Debug, Args)]
pub struct RestartArgs {
    /// Seconds to wait for the guest to stop before killing it.
    #[arg(short = 't', long = "time", default_value_t = 10)]
    time: u32,
    #[arg(required = true)]
    vms: Vec<String>,
}

#[derive(Debug, Args)]
pub struct KillArgs {
    /// Signal to send to the VMM.
    #[arg(short = 's', long, default_value = "KILL")]
    signal: String,
    #[arg(required = true)]
    vms: Vec<String>,
}

#[derive(Debug, Args)]
pub struct PauseArgs {
    #[arg(required = true)]
    vms: Vec<String>,
}

#[derive(Debug, Args)]
pub struct RmArgs {
    /// Kill and remove running VMs.
    #[arg(short = 'f', long)]
    force: bool,
    #[arg(required = true)]
    vms: Vec<String>,
}

#[derive(Debug, Args)]
pub struct WaitArgs {
    #[arg(required = true)]
    vms: Vec<String>,
}

/// Runs `op` for every VM, printing each name on success and each error once; fails if any did.
async fn each<F, Fut>(vms: Vec<String>, mut op: F) -> anyhow::Result<i32>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<String>>>,
{
    let mut failed = false;
    for vm in vms {
        match op(vm.clone()).await {
            Ok(Some(out)) => println!("{out}"),
            Ok(None) => {}
            Err(e) => {
                crate::output::print_error(&e);
                failed = true;
            }
        }
    }
    Ok(if failed { 1 } else { 0 })
}

/// Starts one VM, waiting for its guest to be ready unless `no_wait`; says any warning.
async fn start_one(c: &mut client::Client, vm: &str, no_wait: bool) -> anyhow::Result<()> {
    let req = pb::StartVmRequest { r#ref: vm.to_owned(), wait_ready: !no_wait };
    let r = c.start_vm(req).await?.into_inner();
    if !r.warning.is_empty() {
        eprintln!("hearth: warning: {}", r.warning);
    }
    Ok(())
}

pub async fn start(host: Option<String>, a: StartArgs) -> anyhow::Result<i32> {
    let c = client::connect(host).await?;
    each(a.vms, |vm| {
        let mut c = c.clone();
        async move {
            start_one(&mut c, &vm, a.no_wait).await?;
            Ok(Some(vm))
        }
    })
    .await
}

pub async fn stop(host: Option<String>, a: StopArgs) -> anyhow::Result<i32> {
    let c = client::connect(host).await?;
    each(a.vms, |vm| {
        let mut c = c.clone();
        async move {
            c.stop_vm(pb::StopVmRequest { r#ref: vm.clone(), timeout_secs: a.time.max(1) }).await?;
            Ok(Some(vm))
        }
    })
    .await
}

/// `restart`: a stop (a VM that is not running is only started), then a start, waiting for the
/// guest to be ready.
pub async fn restart(host: Option<String>, a: RestartArgs) -> anyhow::Result<i32> {
    let c = client::connect(host).await?;
    each(a.vms, |vm| {
        let mut c = c.clone();
        async move {
            c.stop_vm(pb::StopVmRequest { r#ref: vm.clone(), timeout_secs: a.time.max(1) }).await?;
            start_one(&mut c, &vm, false).await?;
            Ok(Some(vm))
        }
    })
    .await
}

pub async fn kill(host: Option<String>, a: KillArgs) -> anyhow::Result<i32> {
    let c = client::connect(host).await?;
    each(a.vms, |vm| {
        let (mut c, signal) = (c.clone(), a.signal.clone());
        async move {
            c.kill_vm(pb::KillVmRequest { r#ref: vm.clone(), signal }).await?;
            Ok(Some(vm))
        }
    })
    .await
}

/// `pause` (`paused`) and `unpause`.
pub async fn pause(host: Option<String>, a: PauseArgs, paused: bool) -> anyhow::Result<i32> {
    let c = client::connect(host).await?;
    each(a.vms, |vm| {
        let mut c = c.clone();
        async move {
            let r = pb::Ref { r#ref: vm.clone() };
            if paused {
                c.pause_vm(r).await?;
            } else {
                c.unpause_vm(r).await?;
            }
            Ok(Some(vm))
        }
    })
    .await
}

pub async fn rm(host: Option<String>, a: RmArgs) -> anyhow::Result<i32> {
    let c = client::connect(host).await?;
    each(a.vms, |vm| {
        let mut c = c.clone();
        async move {
            c.remove_vm(pb::RemoveRequest { r#ref: vm.clone(), force: a.force }).await?;
            Ok(Some(vm))
        }
    })
    .await
}

pub async fn wait(host: Option<String>, a: WaitArgs) -> anyhow::Result<i32> {
    let c = client::connect(host).await?;
    each(a.vms, |vm| {
        let mut c = c.clone();
        async move {
            let w = c.wait_vm(pb::Ref { r#ref: vm }).await?.into_inner();
            Ok(Some(w.exit_code.to_string()))
        }
    })
    .await
}

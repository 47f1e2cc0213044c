//! `hearth host check` and `hearth host init`: what this host has for running VMs, and how to
//! fix what it lacks. They look at the host directly (no daemon needed, nothing of hearth's
//! state is edited); `init` prepares the root directory and the bridge network.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use hearth_host::{evaluate, Check, Facts, Level};

use crate::client::DEFAULT_ROOT;

#[derive(Debug, Subcommand)]
pub enum HostCmd {
    /// Check every host requirement and say how to fix what is missing.
    Check(CheckArgs),
    /// Prepare the host: the state directory, the storage check and the bridge network.
    Init(InitArgs),
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// State directory whose filesystem is checked (HEARTH_ROOT, default /var/lib/hearth).
    #[arg(long, env = "HEARTH_ROOT", default_value = DEFAULT_ROOT)]
    root: PathBuf,
    /// Output format: table or json.
    #[arg(short = 'o', long, default_value = "table")]
    output: String,
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// State directory to create (HEARTH_ROOT, default /var/lib/hearth).
    #[arg(long, env = "HEARTH_ROOT", default_value = DEFAULT_ROOT)]
    root: PathBuf,
    /// Leave the network alone (no hearth0 bridge, no forwarding, no NAT table).
    #[arg(long)]
    no_network: bool,
}

pub async fn host(c: HostCmd) -> anyhow::Result<i32> {
    match c {
        HostCmd::Check(a) => {
            let checks = evaluate(&probe(&a.root));
            print_checks(&checks, &a.output)?;
            Ok(if checks.iter().any(|c| c.level == Level::Fail) { 1 } else { 0 })
        }
        HostCmd::Init(a) => init(a).await,
    }
}

fn print_checks(checks: &[Check], format: &str) -> anyhow::Result<()> {
    match format {
        "json" => println!("{}", serde_json::to_string_pretty(checks)?),
        "table" => {
            let rows: Vec<Vec<String>> = checks
                .iter()
                .map(|c| {
                    let level = serde_json::to_value(c.level)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_uppercase))
                        .unwrap_or_default();
                    let detail = if c.fix.is_empty() || c.level == Level::Ok {
                        c.detail.clone()
                    } else {
                        format!("{} — fix: {}", c.detail, c.fix)
                    };
                    vec![c.name.clone(), level, detail]
                })
                .collect();
            crate::output::table(&["CHECK", "STATUS", "DETAIL"], &rows);
            let fails = checks.iter().filter(|c| c.level == Level::Fail).count();
            let warns = checks.iter().filter(|c| c.level == Level::Warn).count();
            println!(
                "\n{fails} failed, {warns} warnings: {}",
                if fails == 0 { "this host can run VMs" } else { "fix the failures to run VMs" }
            );
        }
        other => anyhow::bail!("-o {other:?}: use table or json"),
    }
    Ok(())
}

async fn init(a: InitArgs) -> anyhow::Result<i32> {
    use anyhow::Context;
    anyhow::ensure!(nix::unistd::geteuid().is_root(), "hearth host init must run as root");
    std::fs::create_dir_all(&a.root).with_context(|| format!("creating {}", a.root.display()))?;
    println!("state directory: {}", a.root.display());
    if a.no_network {
        println!("network: left alone (--no-network); --network user needs nothing");
    } else {
        let bridge = hearth_net::Bridge::hearth0();
        hearth_net::ensure_bridge(&bridge)
            .await
            .context("setting up the bridge network (or pass --no-network)")?;
        println!(
            "network: bridge {} at {}/{}, forwarding on, NAT for {} in nftables table ip {}",
            bridge.name,
            bridge.gateway,
            bridge.prefix,
            bridge.subnet(),
            hearth_net::NFT_TABLE
        );
    }
    let checks = evaluate(&probe(&a.root));
    if let Some(storage) = checks.iter().find(|c| c.name == "storage") {
        println!("storage: {}", storage.detail);
    }
    let fails: Vec<&Check> = checks.iter().filter(|c| c.level == Level::Fail).collect();
    for c in &fails {
        println!("still failing: {}: {} — fix: {}", c.name, c.detail, c.fix);
    }
    println!(
        "{}",
        if fails.is_empty() {
            "ready: this host can run VMs (`hearth host check` for details)"
        } else {
            "not ready yet"
        }
    );
    Ok(if fails.is_empty() { 0 } else { 1 })
}

/// This host's facts, with the VMM's KVM verdict and the storage's reflink probe.
fn probe(root: &std::path::Path) -> Facts {
    Facts::probe(root, hearth_vmm::accel::kvm_unusable_here(), |dir| {
        hearth_storage::supports_reflink(dir).ok()
    })
}

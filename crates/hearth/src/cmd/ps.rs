//! `ps`, `inspect`, `version`.

use clap::Args;
use hearth_api::v1 as pb;
use hearth_types::VmRecord;

use crate::client;
use crate::output::{ago, parse_json, status_text, table};

#[derive(Debug, Args)]
pub struct PsArgs {
    /// Show all VMs, not only running ones.
    #[arg(short = 'a', long)]
    all: bool,
    /// Print only ids.
    #[arg(short = 'q', long)]
    quiet: bool,
    /// Output format: table or json.
    #[arg(short = 'o', long, default_value = "table")]
    output: String,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    #[arg(required = true)]
    vms: Vec<String>,
}

pub async fn ps(host: Option<String>, a: PsArgs) -> anyhow::Result<i32> {
    let mut c = client::connect(host).await?;
    let list = c.list_vms(pb::ListVmsRequest { all: a.all }).await?.into_inner();
    let vms: Vec<VmRecord> =
        list.json.iter().map(|j| parse_json(j)).collect::<anyhow::Result<_>>()?;
    if a.quiet {
        for v in &vms {
            println!("{}", v.spec.id);
        }
        return Ok(0);
    }
    match a.output.as_str() {
        "json" => println!("{}", serde_json::to_string_pretty(&vms)?),
        "table" => {
            let rows: Vec<Vec<String>> = vms
                .iter()
                .map(|v| {
                    vec![
                        v.spec.id.to_string(),
                        v.spec.image.clone(),
                        v.spec.kernel.clone(),
                        v.spec.provider.to_string(),
                        format!("{}", v.spec.cpus),
                        format!("{} MiB", v.spec.memory_mib),
                        ago(v.spec.created_at),
                        status_text(v),
                        v.status.ip.clone().unwrap_or_default(),
                        v.spec.ports.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", "),
                        v.spec.name.clone(),
                    ]
                })
                .collect();
            table(
                &[
                    "VM ID", "IMAGE", "KERNEL", "VMM", "CPUS", "MEMORY", "CREATED", "STATUS",
                    "IPS", "PORTS", "NAME",
                ],
                &rows,
            );
        }
        other => anyhow::bail!("-o must be table or json, got {other:?}"),
    }
    Ok(0)
}

pub async fn inspect(host: Option<String>, a: InspectArgs) -> anyhow::Result<i32> {
    let mut c = client::connect(host).await?;
    let mut out = Vec::new();
    for vm in a.vms {
        let r = c.inspect_vm(pb::Ref { r#ref: vm }).await?.into_inner();
        out.push(serde_json::from_str::<serde_json::Value>(&r.json)?);
    }
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(0)
}

/// `hearth info`: what the daemon has, and how it stores and networks VMs.
pub async fn info(host: Option<String>, output: &str) -> anyhow::Result<i32> {
    let mut c = client::connect(host).await?;
    let info: serde_json::Value =
        serde_json::from_str(&c.info(pb::Empty {}).await?.into_inner().json)?;
    if output == "json" {
        println!("{}", serde_json::to_string_pretty(&info)?);
        return Ok(0);
    }
    anyhow::ensure!(output == "table", "-o {output:?}: expected table or json");
    let s = |k: &str| info[k].as_str().unwrap_or("").to_owned();
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    let vms = &info["vms"];
    println!("Server version: hearthd {}", s("version"));
    println!("Root: {}", s("root"));
    println!(
        "VMs: {} (running {}, stopped {})",
        n(&vms["total"]),
        n(&vms["running"]),
        n(&vms["total"]) - n(&vms["running"]).min(n(&vms["total"]))
    );
    println!("Images: {}", n(&info["images"]));
    let default =
        info["default_kernel"].as_str().map(|k| format!(" (default {k})")).unwrap_or_default();
    println!("Kernels: {}{default}", n(&info["kernels"]));
    println!("Default VMM: {}; accelerator: {}", s("default_vmm"), s("accel"));
    let storage = &info["storage"];
    println!("Storage: {}", storage["detail"].as_str().unwrap_or(""));
    if let Some(parent) = info["parent_iface"].as_str() {
        println!("macvtap interface: {parent}");
    }
    if matches!(storage["level"].as_str(), Some("warn" | "fail")) {
        println!(
            "WARNING: {} — fix: {}",
            storage["detail"].as_str().unwrap_or(""),
            storage["fix"].as_str().unwrap_or("")
        );
    }
    Ok(0)
}

pub async fn version(host: Option<String>) -> anyhow::Result<i32> {
    println!("Client: hearth {}", env!("CARGO_PKG_VERSION"));
    let mut c = client::connect(host).await?;
    let v = c.version(pb::Empty {}).await?.into_inner();
    println!("Server: hearthd {} (root {}, accelerator {})", v.version, v.root, v.accel);
    Ok(0)
}

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
    print!("{}", info_text(&info));
    Ok(0)
}

/// `hearth info`'s table: what the daemon reported, a warning where its storage needs one.
fn info_text(info: &serde_json::Value) -> String {
    use std::fmt::Write;
    let s = |k: &str| info[k].as_str().unwrap_or("").to_owned();
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    let vms = &info["vms"];
    let (total, running) = (n(&vms["total"]), n(&vms["running"]));
    let mut out = String::new();
    let _ = writeln!(out, "Server version: hearthd {}", s("version"));
    let _ = writeln!(out, "Root: {}", s("root"));
    let _ =
        writeln!(out, "VMs: {total} (running {running}, stopped {})", total - running.min(total));
    let _ = writeln!(out, "Images: {}", n(&info["images"]));
    let default =
        info["default_kernel"].as_str().map(|k| format!(" (default {k})")).unwrap_or_default();
    let _ = writeln!(out, "Kernels: {}{default}", n(&info["kernels"]));
    let _ = writeln!(out, "Default VMM: {}; accelerator: {}", s("default_vmm"), s("accel"));
    let storage = &info["storage"];
    let _ = writeln!(out, "Storage: {}", storage["detail"].as_str().unwrap_or(""));
    if let Some(parent) = info["parent_iface"].as_str() {
        let _ = writeln!(out, "macvtap interface: {parent}");
    }
    if matches!(storage["level"].as_str(), Some("warn" | "fail")) {
        let _ = writeln!(
            out,
            "WARNING: {} — fix: {}",
            storage["detail"].as_str().unwrap_or(""),
            storage["fix"].as_str().unwrap_or("")
        );
    }
    out
}

pub async fn version(host: Option<String>) -> anyhow::Result<i32> {
    println!("Client: hearth {}", env!("CARGO_PKG_VERSION"));
    let mut c = client::connect(host).await?;
    let v = c.version(pb::Empty {}).await?.into_inner();
    println!("Server: hearthd {} (root {}, accelerator {})", v.version, v.root, v.accel);
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_warns_when_the_daemons_storage_needs_it() {
        let mut info = serde_json::json!({
            "version": "0.1.0", "root": "/var/lib/hearth",
            "vms": {"total": 3, "running": 1}, "images": 2, "kernels": 1,
            "default_kernel": "debian", "default_vmm": "qemu", "accel": "tcg",
            "storage": {"level": "ok", "detail": "hearth-thinpool: data 12.0% used of 100.0 GiB, metadata 1.0%"}
        });
        let text = info_text(&info);
        assert!(text.contains("VMs: 3 (running 1, stopped 2)\n"), "{text}");
        assert!(text.contains("Kernels: 1 (default debian)\n"), "{text}");
        assert!(!text.contains("WARNING") && !text.contains("macvtap"), "{text}");
        info["storage"] = serde_json::json!({
            "level": "warn",
            "detail": "hearth-thinpool: data 85.0% used of 100.0 GiB, metadata 1.0%: filling up",
            "fix": "grow the pool or remove VMs and images"
        });
        info["parent_iface"] = "eth0".into();
        let text = info_text(&info);
        assert!(text.contains("macvtap interface: eth0\n"), "{text}");
        assert!(
            text.contains("WARNING: hearth-thinpool: data 85.0% used of 100.0 GiB, metadata 1.0%: filling up — fix: grow the pool"),
            "{text}"
        );
    }
}

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

pub async fn version(host: Option<String>) -> anyhow::Result<i32> {
    println!("Client: hearth {}", env!("CARGO_PKG_VERSION"));
    let mut c = client::connect(host).await?;
    let v = c.version(pb::Empty {}).await?.into_inner();
    println!("Server: hearthd {} (root {}, accelerator {})", v.version, v.root, v.accel);
    Ok(0)
}

//! `hearth snapshot create|ls|rm`; `hearth run --snapshot NAME` makes a VM from one.

use clap::Subcommand;
use hearth_api::v1 as pb;
use hearth_types::snapshot::SnapshotRecord;

use crate::client;
use crate::output::{parse_json, table};

#[derive(Debug, Subcommand)]
pub enum SnapshotCmd {
    /// Snapshot a running VM: its guest's memory and devices, and copies of its disks (the
    /// guest is stopped meanwhile, then runs on). `hearth run --snapshot NAME` starts new VMs
    /// where it was.
    Create { vm: String, name: String },
    /// List snapshots.
    #[command(alias = "list")]
    Ls {
        #[arg(short = 'o', long, default_value = "table")]
        output: String,
    },
    /// Remove snapshots.
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
}

pub async fn snapshot(host: Option<String>, cmd: SnapshotCmd) -> anyhow::Result<i32> {
    let mut c = client::connect(host).await?;
    match cmd {
        SnapshotCmd::Create { vm, name } => {
            let r = c
                .create_snapshot(pb::CreateSnapshotRequest { r#ref: vm, name })
                .await?
                .into_inner();
            let s: SnapshotRecord = parse_json(&r.json)?;
            println!("{}", s.name);
        }
        SnapshotCmd::Ls { output } => {
            let list = c.list_snapshots(pb::Empty {}).await?.into_inner();
            let all: Vec<SnapshotRecord> =
                list.json.iter().map(|j| parse_json(j)).collect::<anyhow::Result<_>>()?;
            if output == "json" {
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else {
                let rows: Vec<Vec<String>> = all
                    .iter()
                    .map(|s| {
                        vec![
                            s.name.clone(),
                            s.spec.name.clone(),
                            s.spec.image.clone(),
                            format!("{} ({})", s.spec.provider, s.vmm_version),
                            format!(
                                "{} CPU, {}",
                                s.spec.cpus,
                                hearth_types::format_size(s.spec.memory_mib << 20)
                            ),
                            hearth_types::format_size(s.size_bytes),
                            crate::output::ago(s.created_at / 1000),
                        ]
                    })
                    .collect();
                table(&["NAME", "VM", "IMAGE", "VMM", "SHAPE", "SIZE", "CREATED"], &rows);
            }
        }
        SnapshotCmd::Rm { names } => {
            for n in names {
                c.remove_snapshot(pb::Ref { r#ref: n.clone() }).await?;
                println!("Deleted: {n}");
            }
        }
    }
    Ok(0)
}

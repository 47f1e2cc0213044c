//! `hearth kernel import|pull|ls|rm|default`.

use clap::Subcommand;
use hearth_api::v1 as pb;
use hearth_types::KernelRecord;

use crate::client;
use crate::output::{ago, parse_json, table};

#[derive(Debug, Subcommand)]
pub enum KernelCmd {
    /// Import a kernel file (ELF vmlinux or bzImage) and its modules.
    Import {
        file: std::path::PathBuf,
        /// The kernel's modules: a lib/modules/VERSION directory, or a root holding lib/modules.
        #[arg(long)]
        modules: Option<std::path::PathBuf>,
        #[arg(long)]
        name: String,
        /// Make it the default kernel.
        #[arg(long)]
        default: bool,
    },
    /// Pull an Ignite-style kernel image (/boot/vmlinux and /lib/modules).
    Pull {
        #[arg(long)]
        insecure: bool,
        /// Name to store it under (default: its reference, `repo:tag`, which `--kernel` takes).
        #[arg(long)]
        name: Option<String>,
        image: String,
    },
    /// List kernels.
    #[command(alias = "list")]
    Ls {
        #[arg(short = 'o', long, default_value = "table")]
        output: String,
    },
    /// Remove kernels.
    Rm {
        #[arg(short = 'f', long)]
        force: bool,
        #[arg(required = true)]
        kernels: Vec<String>,
    },
    /// Set the default kernel.
    Default { name: String },
}

pub async fn kernel(host: Option<String>, cmd: KernelCmd) -> anyhow::Result<i32> {
    let mut c = client::connect(host).await?;
    match cmd {
        KernelCmd::Import { file, modules, name, default } => {
            let abs = |p: &std::path::Path| {
                std::fs::canonicalize(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))
            };
            let path = abs(&file)?.display().to_string();
            let modules = modules
                .as_deref()
                .map(abs)
                .transpose()?
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            let r = c
                .import_kernel(pb::ImportKernelRequest {
                    path,
                    modules,
                    name,
                    make_default: default,
                })
                .await?
                .into_inner();
            let k: KernelRecord = parse_json(&r.json)?;
            println!("{} {}", k.name, k.version);
        }
        KernelCmd::Pull { insecure, name, image } => {
            let k = pull(&mut c, &image, name, insecure).await?;
            println!("{} {}", k.name, k.version);
        }
        KernelCmd::Ls { output } => {
            let list = c.list_kernels(pb::Empty {}).await?.into_inner();
            let ks: Vec<KernelRecord> =
                list.json.iter().map(|j| parse_json(j)).collect::<anyhow::Result<_>>()?;
            if output == "json" {
                println!("{}", serde_json::to_string_pretty(&ks)?);
            } else {
                let rows: Vec<Vec<String>> = ks
                    .iter()
                    .map(|k| {
                        let mark = if k.name == list.default { "*" } else { "" };
                        vec![
                            format!("{}{mark}", k.name),
                            k.version.clone(),
                            k.format_detail(),
                            k.modules.to_string(),
                            ago(k.created_at),
                        ]
                    })
                    .collect();
                table(&["NAME", "VERSION", "FORMAT", "MODULES", "CREATED"], &rows);
            }
        }
        KernelCmd::Rm { force, kernels } => {
            for k in kernels {
                c.remove_kernel(pb::RemoveRequest { r#ref: k.clone(), force }).await?;
                println!("Deleted: {k}");
            }
        }
        KernelCmd::Default { name } => {
            c.set_default_kernel(pb::Ref { r#ref: name }).await?;
        }
    }
    Ok(0)
}

/// Pulls the kernel image `reference` and imports it, under `name` or else its reference.
pub async fn pull(
    c: &mut client::Client,
    reference: &str,
    name: Option<String>,
    insecure: bool,
) -> anyhow::Result<KernelRecord> {
    let mut s = c
        .pull_kernel(pb::PullKernelRequest {
            r#ref: reference.to_owned(),
            name: name.unwrap_or_default(),
            insecure,
        })
        .await?
        .into_inner();
    while let Some(p) = s.message().await? {
        if !p.result_json.is_empty() {
            return parse_json(&p.result_json);
        }
    }
    anyhow::bail!("the daemon ended the pull of {reference} without a result")
}

//! `hearth image pull|import|ls|rm`.

use std::collections::HashMap;
use std::io::IsTerminal;

use clap::Subcommand;
use hearth_api::v1 as pb;
use hearth_types::ImageRecord;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use crate::client::{self, Client};
use crate::output::{ago, human_bytes, parse_json, table};

#[derive(Debug, Subcommand)]
pub enum ImageCmd {
    /// Pull an image from an OCI or Docker registry.
    Pull {
        /// Use plain http / skip TLS verification for this registry.
        #[arg(long)]
        insecure: bool,
        image: String,
    },
    /// Import an OCI layout directory, a `docker save` tar, or a plain rootfs tar.
    Import {
        path: std::path::PathBuf,
        /// The reference to store it under.
        #[arg(long)]
        name: String,
    },
    /// List images.
    #[command(alias = "list")]
    Ls {
        #[arg(short = 'q', long)]
        quiet: bool,
        #[arg(short = 'o', long, default_value = "table")]
        output: String,
    },
    /// Remove images.
    #[command(alias = "remove")]
    Rm {
        /// Remove even if VMs use it.
        #[arg(short = 'f', long)]
        force: bool,
        #[arg(required = true)]
        images: Vec<String>,
    },
}

/// Pulls with per-layer progress bars on a terminal, a line per layer otherwise.
pub async fn pull(
    c: &mut Client,
    image: &str,
    insecure: bool,
    quiet_done: bool,
) -> anyhow::Result<()> {
    let mut s = c
        .pull_image(pb::PullImageRequest { r#ref: image.to_owned(), insecure })
        .await?
        .into_inner();
    let tty = std::io::stderr().is_terminal();
    let multi = MultiProgress::new();
    let mut bars: HashMap<String, ProgressBar> = HashMap::new();
    let style = ProgressStyle::with_template("{msg:14} [{bar:30}] {bytes}/{total_bytes}")
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    while let Some(p) = s.message().await? {
        if !p.result_json.is_empty() {
            let rec: ImageRecord = parse_json(&p.result_json)?;
            if !quiet_done {
                println!("{}", rec.id);
            } else {
                eprintln!("Pulled {image} ({})", rec.id.short());
            }
            return Ok(());
        }
        let short: String = p.digest.trim_start_matches("sha256:").chars().take(12).collect();
        if !tty {
            if p.done {
                eprintln!("{short}: done");
            }
            continue;
        }
        let bar = bars.entry(p.digest.clone()).or_insert_with(|| {
            let b = multi.add(ProgressBar::new(0));
            b.set_style(style.clone());
            b.set_message(short.clone());
            b
        });
        if p.total > 0 {
            bar.set_length(p.total);
        }
        if p.current > 0 {
            bar.inc(p.current);
        }
        if p.done {
            bar.finish();
        }
    }
    anyhow::bail!("the daemon ended the pull of {image} without a result")
}

pub async fn image(host: Option<String>, cmd: ImageCmd) -> anyhow::Result<i32> {
    let mut c = client::connect(host).await?;
    match cmd {
        ImageCmd::Pull { insecure, image } => pull(&mut c, &image, insecure, false).await?,
        ImageCmd::Import { path, name } => {
            let path = std::fs::canonicalize(&path)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            let r = c
                .import_image(pb::ImportImageRequest { path: path.display().to_string(), name })
                .await?
                .into_inner();
            let rec: ImageRecord = parse_json(&r.json)?;
            println!("{}", rec.id);
        }
        ImageCmd::Ls { quiet, output } => {
            let list = c.list_images(pb::Empty {}).await?.into_inner();
            let imgs: Vec<ImageRecord> =
                list.json.iter().map(|j| parse_json(j)).collect::<anyhow::Result<_>>()?;
            if quiet {
                imgs.iter().for_each(|i| println!("{}", i.id.short()));
            } else if output == "json" {
                println!("{}", serde_json::to_string_pretty(&imgs)?);
            } else {
                let mut rows = Vec::new();
                for i in &imgs {
                    let names = if i.names.is_empty() {
                        vec!["<none>".to_owned()]
                    } else {
                        i.names.clone()
                    };
                    for n in names {
                        rows.push(vec![
                            n,
                            i.id.short().to_owned(),
                            ago(i.created_at),
                            human_bytes(i.size),
                        ]);
                    }
                }
                table(&["NAME", "IMAGE ID", "CREATED", "SIZE"], &rows);
            }
        }
        ImageCmd::Rm { force, images } => {
            let mut failed = false;
            for i in images {
                match c.remove_image(pb::RemoveRequest { r#ref: i.clone(), force }).await {
                    Ok(_) => println!("Deleted: {i}"),
                    Err(s) => {
                        eprintln!("hearth: {}", s.message());
                        failed = true;
                    }
                }
            }
            return Ok(i32::from(failed));
        }
    }
    Ok(0)
}

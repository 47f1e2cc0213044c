//! `hearth ssh`: OpenSSH's client to a VM started with `--ssh`, through its loopback forward.

use std::os::unix::process::CommandExt;

use anyhow::{bail, Context};
use clap::Args;
use hearth_api::v1 as pb;
use hearth_types::net::SSH_PORT;
use hearth_types::{NetworkMode, VmRecord, VmState};

use crate::client;
use crate::output::parse_json;

#[derive(Debug, Args)]
pub struct SshArgs {
    /// Private key to use (default: the key hearth generated for the VM, else ssh's own).
    #[arg(short = 'i', long = "identity")]
    identity: Option<String>,
    /// Force a terminal even when a command is given.
    #[arg(short = 't', long)]
    tty: bool,
    /// Login user in the guest.
    #[arg(short = 'l', long = "user", default_value = "root")]
    user: String,
    /// The VM.
    vm: String,
    /// Command to run instead of a login shell.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

/// The `ssh` arguments that reach `rec`'s guest, or why it cannot be reached.
pub fn ssh_args(rec: &VmRecord, a: &SshArgs) -> anyhow::Result<Vec<String>> {
    let name = &rec.spec.name;
    if rec.spec.ssh_public_key.is_none() {
        bail!("VM {name} was not created with --ssh; use `hearth exec {name} -- sh`, or create it again with --ssh");
    }
    if rec.spec.network == NetworkMode::Macvtap {
        bail!("VM {name} is on the host's LAN through a macvtap (MAC {}): ssh to the address it took there", rec.spec.mac());
    }
    // The user-mode network forwards a loopback port; on the bridge the guest is reachable.
    let (host, port) = match (rec.status.state, rec.status.ssh_port, &rec.status.ip) {
        (VmState::Running | VmState::Starting, Some(p), _) => ("127.0.0.1".to_owned(), p),
        (VmState::Running | VmState::Starting, None, Some(ip))
            if rec.spec.network == NetworkMode::Bridge =>
        {
            (ip.clone(), SSH_PORT)
        }
        _ => bail!("VM {name} is {}; start it with `hearth start {name}`", rec.status.state),
    };
    // Every VM's forward is a new host key on a reused loopback port: known_hosts would only
    // ever hold stale entries, so it is not consulted (as Ignite does).
    let mut args: Vec<String> = [
        "-p",
        &port.to_string(),
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "LogLevel=ERROR",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if let Some(key) = a.identity.as_ref().or(rec.status.ssh_key_path.as_ref()) {
        args.extend(["-i".into(), key.clone(), "-o".into(), "IdentitiesOnly=yes".into()]);
    }
    if a.tty {
        args.push("-t".into());
    }
    args.push(format!("{}@{host}", a.user));
    let command = match a.command.first().map(String::as_str) {
        Some("--") => &a.command[1..],
        _ => &a.command[..],
    };
    if !command.is_empty() {
        args.push("--".into());
        args.extend(command.iter().cloned());
    }
    Ok(args)
}

pub async fn ssh(host: Option<String>, a: SshArgs) -> anyhow::Result<i32> {
    let mut c = client::connect(host).await?;
    let r = c.inspect_vm(pb::Ref { r#ref: a.vm.clone() }).await?.into_inner();
    let rec: VmRecord = parse_json(&r.json)?;
    let args = ssh_args(&rec, &a)?;
    let err = std::process::Command::new("ssh").args(&args).exec();
    Err(err).context("running ssh (install OpenSSH's client: apt-get install openssh-client)")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        a: SshArgs,
    }

    fn args(cli: &[&str]) -> SshArgs {
        T::parse_from(std::iter::once("ssh").chain(cli.iter().copied())).a
    }

    fn running() -> VmRecord {
        let mut r = hearth_testkit::record(1, hearth_types::Desired::Running, VmState::Running);
        r.spec.ssh_public_key = Some("ssh-ed25519 AAAA".into());
        r.status.ssh_port = Some(40022);
        r.status.ssh_key_path = Some("/var/lib/hearth/vms/x/ssh/id_ed25519".into());
        r
    }

    #[test]
    fn reaches_the_loopback_forward_with_the_vms_key() {
        let a = ssh_args(&running(), &args(&["vm1", "--", "uname", "-a"])).expect("args");
        let s = a.join(" ");
        assert!(s.starts_with("-p 40022 "), "{s}");
        assert!(s.contains("-i /var/lib/hearth/vms/x/ssh/id_ed25519 -o IdentitiesOnly=yes"), "{s}");
        assert!(s.ends_with("root@127.0.0.1 -- uname -a"), "{s}");
        let a = ssh_args(&running(), &args(&["-i", "/k", "-t", "-l", "app", "vm1"])).expect("args");
        let s = a.join(" ");
        assert!(s.contains("-i /k ") && s.ends_with("-t app@127.0.0.1"), "{s}");
    }

    #[test]
    fn reaches_a_bridged_vm_at_its_own_address() {
        let mut r = running();
        r.spec.network = NetworkMode::Bridge;
        r.status.ssh_port = None;
        r.status.ip = Some("10.61.0.7".into());
        let s = ssh_args(&r, &args(&["vm1"])).expect("args").join(" ");
        assert!(s.starts_with("-p 22 ") && s.ends_with("root@10.61.0.7"), "{s}");
    }

    #[test]
    fn explains_why_a_vm_cannot_be_reached() {
        let mut r = running();
        r.status.state = VmState::Stopped;
        let e = ssh_args(&r, &args(&["vm1"])).expect_err("stopped").to_string();
        assert!(e.contains("is stopped") && e.contains("hearth start vm1"), "{e}");
        r.spec.ssh_public_key = None;
        let e = ssh_args(&r, &args(&["vm1"])).expect_err("no ssh").to_string();
        assert!(e.contains("--ssh") && e.contains("hearth exec"), "{e}");
    }
}

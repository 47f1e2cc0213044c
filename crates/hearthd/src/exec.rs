//! `exec` and `cp` through the guest agent: one agent stream per call.

use std::sync::Arc;

use crate::adapters::{AgentClient, Stream};
use hearth_api::v1 as pb;
use hearth_types::agent::{CopyRequest, ExecExit, ExecRequest, Frame, Kind};
use hearth_types::{VmRecord, VmState};
use tokio::sync::mpsc;
use tonic::Status;

use crate::daemon::Daemon;

/// Largest stdin/copy chunk forwarded in one frame: a quarter of the flow-control window, so
/// several are in flight while the guest hands credit back.
const CHUNK: usize = (hearth_types::agent::WINDOW / 4) as usize;

async fn agent_for(d: &Daemon, rec: &VmRecord) -> Result<Arc<AgentClient>, Status> {
    if rec.status.state != VmState::Running {
        return Err(Status::failed_precondition(format!(
            "VM {} is {}, not running with a ready guest agent",
            rec.spec.name, rec.status.state
        )));
    }
    if rec.status.paused {
        return Err(Status::failed_precondition(format!(
            "VM {0} is paused: its guest cannot answer; unpause it first (hearth unpause {0})",
            rec.spec.name
        )));
    }
    d.agent(&rec.spec.id).await.map_err(|e| Status::unavailable(format!("{e}")))
}

fn lost(id: u32) -> Status {
    Status::unavailable(format!(
        "the guest agent connection was lost during stream {id} (did the VM stop?)"
    ))
}

/// Runs `hearth exec`.
pub async fn exec(
    d: Arc<Daemon>,
    mut input: tonic::Streaming<pb::ExecInput>,
) -> Result<mpsc::Receiver<Result<pb::ExecOutput, Status>>, Status> {
    let first = input
        .message()
        .await?
        .ok_or_else(|| Status::invalid_argument("exec needs a start message"))?;
    let start = first
        .start
        .ok_or_else(|| Status::invalid_argument("the first exec message must carry `start`"))?;
    if start.args.is_empty() {
        return Err(Status::invalid_argument("no command given: hearth exec VM -- COMMAND"));
    }
    let rec = d.resolve(&start.r#ref)?;
    let agent = agent_for(&d, &rec).await?;
    let mut stream = agent.open_stream();
    let (id, input_tx) = (stream.id, stream.input());
    let req = ExecRequest {
        args: start.args,
        env: start.env,
        cwd: start.cwd,
        user: start.user,
        tty: start.tty,
        rows: start.rows.min(u16::MAX.into()) as u16,
        cols: start.cols.min(u16::MAX.into()) as u16,
    };
    agent.send(Frame::json(Kind::Exec, id, &req)).await.map_err(|_| lost(id))?;
    tokio::spawn(async move {
        while let Ok(Some(m)) = input.message().await {
            let mut frames = Vec::new();
            for c in m.stdin.chunks(CHUNK) {
                frames.push(Frame::new(Kind::Stdin, id, c.to_vec()));
            }
            if m.stdin_eof {
                frames.push(Frame::new(Kind::Stdin, id, Vec::new()));
            }
            if m.signal > 0 {
                frames.push(Frame::new(Kind::Signal, id, m.signal.to_be_bytes().to_vec()));
            }
            if m.rows > 0 && m.cols > 0 {
                let mut p = (m.rows.min(u16::MAX.into()) as u16).to_be_bytes().to_vec();
                p.extend_from_slice(&(m.cols.min(u16::MAX.into()) as u16).to_be_bytes());
                frames.push(Frame::new(Kind::Resize, id, p));
            }
            for f in frames {
                // Stdin waits for the guest's credit; this task alone waits.
                if input_tx.send(f).await.is_err() {
                    return;
                }
            }
        }
    });
    let (tx, out) = mpsc::channel(32);
    tokio::spawn(async move {
        loop {
            let Some(f) = stream.recv().await else {
                let _ = tx.send(Err(lost(id))).await;
                break;
            };
            let msg = match f.kind {
                Kind::Stdout => pb::ExecOutput { stdout: f.payload, ..Default::default() },
                Kind::Stderr => pb::ExecOutput { stderr: f.payload, ..Default::default() },
                Kind::Exit => {
                    let x: ExecExit =
                        f.parse().unwrap_or(ExecExit { exit_code: 255, signal: None });
                    let _ = tx
                        .send(Ok(pb::ExecOutput {
                            exited: true,
                            exit_code: x.exit_code,
                            ..Default::default()
                        }))
                        .await;
                    break;
                }
                Kind::Error => {
                    let _ = tx
                        .send(Err(Status::internal(
                            String::from_utf8_lossy(&f.payload).into_owned(),
                        )))
                        .await;
                    break;
                }
                _ => continue,
            };
            if tx.send(Ok(msg)).await.is_err() {
                // The client left: stop the process.
                let _ = agent
                    .send(Frame::new(Kind::Signal, id, libc::SIGKILL.to_be_bytes().to_vec()))
                    .await;
                break;
            }
        }
        agent.close_stream(id);
    });
    Ok(out)
}

/// Waits for a copy stream's end.
async fn finish(agent: &AgentClient, stream: &mut Stream) -> Result<(), Status> {
    let id = stream.id;
    let r = loop {
        match stream.recv().await {
            Some(f) if f.kind == Kind::Exit => break Ok(()),
            Some(f) if f.kind == Kind::Error => {
                break Err(Status::failed_precondition(
                    String::from_utf8_lossy(&f.payload).into_owned(),
                ))
            }
            Some(_) => continue,
            None => break Err(lost(id)),
        }
    };
    agent.close_stream(id);
    r
}

/// `hearth cp HOST VM:PATH`: a tar stream unpacked in the guest.
pub async fn copy_to(
    d: Arc<Daemon>,
    mut input: tonic::Streaming<pb::CopyChunk>,
) -> Result<(), Status> {
    let first = input
        .message()
        .await?
        .ok_or_else(|| Status::invalid_argument("copy needs the VM and path first"))?;
    if first.path.is_empty() {
        return Err(Status::invalid_argument("no guest path given: VM:PATH"));
    }
    let rec = d.resolve(&first.r#ref)?;
    let agent = agent_for(&d, &rec).await?;
    let mut stream = agent.open_stream();
    let (id, tx) = (stream.id, stream.input());
    agent
        .send(Frame::json(Kind::CopyIn, id, &CopyRequest { path: first.path }))
        .await
        .map_err(|_| lost(id))?;
    for c in first.data.chunks(CHUNK) {
        tx.send(Frame::new(Kind::Stdin, id, c.to_vec())).await.map_err(|_| lost(id))?;
    }
    while let Some(chunk) = input.message().await? {
        for c in chunk.data.chunks(CHUNK) {
            tx.send(Frame::new(Kind::Stdin, id, c.to_vec())).await.map_err(|_| lost(id))?;
        }
    }
    tx.send(Frame::new(Kind::Stdin, id, Vec::new())).await.map_err(|_| lost(id))?;
    finish(&agent, &mut stream).await
}

/// `hearth cp VM:PATH HOST`: the guest path as a tar stream.
pub async fn copy_from(
    d: Arc<Daemon>,
    req: pb::CopyFromRequest,
) -> Result<mpsc::Receiver<Result<pb::CopyChunk, Status>>, Status> {
    let rec = d.resolve(&req.r#ref)?;
    let agent = agent_for(&d, &rec).await?;
    let mut stream = agent.open_stream();
    let id = stream.id;
    agent
        .send(Frame::json(Kind::CopyOut, id, &CopyRequest { path: req.path }))
        .await
        .map_err(|_| lost(id))?;
    let (tx, out) = mpsc::channel(32);
    tokio::spawn(async move {
        loop {
            let msg = match stream.recv().await {
                Some(f) if f.kind == Kind::Stdout => {
                    Ok(pb::CopyChunk { data: f.payload, ..Default::default() })
                }
                Some(f) if f.kind == Kind::Exit => break,
                Some(f) if f.kind == Kind::Error => Err(Status::failed_precondition(
                    String::from_utf8_lossy(&f.payload).into_owned(),
                )),
                Some(_) => continue,
                None => Err(lost(id)),
            };
            let stop = msg.is_err();
            if tx.send(msg).await.is_err() || stop {
                break;
            }
        }
        agent.close_stream(id);
    });
    Ok(out)
}

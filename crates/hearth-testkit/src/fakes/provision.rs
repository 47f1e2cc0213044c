//! Owners' records and a registry, in memory, for the provisioner.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use hearth_core::ports::{Fetch, Job, Jobs, Outcome};
use hearth_core::{Error, Result};
use hearth_types::{ImageConfig, ImageRecord};
use tokio::sync::watch;

use super::FakeHost;

/// Where an owner stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Pending,
    Created,
    Failed,
    Deleting,
}

#[derive(Debug)]
struct Owner {
    job: Job,
    phase: Phase,
    outcomes: Vec<Outcome>,
}

/// Owners' records in memory.
#[derive(Debug, Default)]
pub struct FakeJobs(Mutex<HashMap<String, Owner>>);

impl FakeJobs {
    pub fn add(&self, owner: &str, job: Job) {
        let o = Owner { job, phase: Phase::Pending, outcomes: vec![] };
        self.0.lock().unwrap_or_else(|e| e.into_inner()).insert(owner.into(), o);
    }
    /// What a Delete request does before it asks the provisioner.
    pub fn mark_deleting(&self, owner: &str) {
        if let Some(o) = self.0.lock().unwrap_or_else(|e| e.into_inner()).get_mut(owner) {
            o.phase = Phase::Deleting;
        }
    }
    pub fn phase(&self, owner: &str) -> Option<Phase> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).get(owner).map(|o| o.phase)
    }
    /// Every outcome recorded for the owner, in order.
    pub fn outcomes(&self, owner: &str) -> Vec<Outcome> {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.get(owner).map(|o| o.outcomes.clone()).unwrap_or_default()
    }
    /// The failure count the owner's record shows.
    pub fn failures(&self, owner: &str) -> Option<u32> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).get(owner).map(|o| o.job.failures)
    }
}

impl Jobs for FakeJobs {
    fn pending(&self, owner: &str) -> Result<Option<Job>> {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        Ok(map.get(owner).filter(|o| o.phase == Phase::Pending).map(|o| o.job.clone()))
    }
    fn deleting(&self, owner: &str) -> Result<bool> {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        Ok(map.get(owner).is_none_or(|o| o.phase == Phase::Deleting))
    }
    fn record(&self, owner: &str, outcome: &Outcome) -> Result<()> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let Some(o) = map.get_mut(owner) else { return Ok(()) };
        let (phase, failures) = match outcome {
            Outcome::Created => (Phase::Created, 0),
            Outcome::Retrying { failures, .. } => (Phase::Pending, *failures),
            Outcome::Failed { failures, .. } => (Phase::Failed, *failures),
        };
        if o.phase != Phase::Deleting {
            o.phase = phase;
        }
        o.job.failures = failures;
        o.outcomes.push(outcome.clone());
        Ok(())
    }
    fn remove(&self, owner: &str) -> Result<()> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(owner);
        Ok(())
    }
}

/// How the fake registry answers for one reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Unavailable this many more times, then the image.
    Unavailable(u32),
    /// Refused for good (no such image, or not allowed).
    Refused,
    /// Waits until [`FakeFetch::release`], then the image.
    Stall,
}

/// A registry: every reference is an image of 16 MiB unless told otherwise; pulls land in the
/// fake host's image store.
#[derive(Debug)]
pub struct FakeFetch {
    host: Arc<FakeHost>,
    answers: Mutex<HashMap<String, Answer>>,
    pulls: Mutex<Vec<String>>,
    imports: Mutex<Vec<String>>,
    released: watch::Sender<bool>,
}

impl FakeFetch {
    pub fn new(host: Arc<FakeHost>) -> Self {
        Self {
            host,
            answers: Mutex::default(),
            pulls: Mutex::default(),
            imports: Mutex::default(),
            released: watch::channel(false).0,
        }
    }
    pub fn answer(&self, reference: &str, answer: Answer) {
        self.answers.lock().unwrap_or_else(|e| e.into_inner()).insert(reference.into(), answer);
    }
    /// Lets stalled pulls go on.
    pub fn release(&self) {
        self.released.send_replace(true);
    }
    /// Every pull asked for, in order.
    pub fn pulls(&self) -> Vec<String> {
        self.pulls.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
    /// The kernels imported, by name.
    pub fn imports(&self) -> Vec<String> {
        self.imports.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

#[async_trait]
impl Fetch for FakeFetch {
    async fn pull(&self, reference: &str) -> Result<ImageRecord> {
        use hearth_core::ports::Images as _;
        self.pulls.lock().unwrap_or_else(|e| e.into_inner()).push(reference.into());
        let answer = {
            let mut answers = self.answers.lock().unwrap_or_else(|e| e.into_inner());
            match answers.get_mut(reference) {
                Some(Answer::Unavailable(0)) | None => None,
                Some(Answer::Unavailable(n)) => {
                    *n -= 1;
                    Some(Answer::Unavailable(*n))
                }
                Some(a) => Some(a.clone()),
            }
        };
        match answer {
            Some(Answer::Unavailable(_)) => {
                return Err(Error::unavailable(format!("pulling {reference}: connection refused")))
            }
            Some(Answer::Refused) => {
                return Err(Error::precondition(format!("pulling {reference}: not found")))
            }
            Some(Answer::Stall) => {
                let _ = self.released.subscribe().wait_for(|r| *r).await;
            }
            None => {}
        }
        match self.host.find(reference)? {
            Some(image) => Ok(image),
            None => Ok(self.host.add_image(reference, ImageConfig::default(), 16 << 20, None)),
        }
    }

    async fn import_initrd(&self, image: &ImageRecord, file: &str) -> Result<String> {
        self.imports.lock().unwrap_or_else(|e| e.into_inner()).push(format!("initrd {file}"));
        Ok(image.id.hex().to_owned())
    }

    async fn import_kernel(&self, _: &ImageRecord, _: Option<&str>, name: &str) -> Result<()> {
        self.imports.lock().unwrap_or_else(|e| e.into_inner()).push(name.into());
        self.host.add_kernel(name);
        Ok(())
    }
}

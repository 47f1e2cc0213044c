//! Provisioning for owners outside hearth (Flintlock's microVMs): pull the kernel's image and
//! import the kernel, pull the root and volume images, create the owner's VM and start it.
//!
//! Attempts are work items on one [`DelayQueue`]: a failure that may pass (a registry away) is
//! queued again after a capped back-off, so no task sleeps between attempts. An attempt holds
//! the owner's lock; a delete signals the attempt in flight, which gives up at its next step or
//! at once while it waits on a pull, then removes whatever VM exists and the record. So a
//! delete always wins, and never waits behind a registry that stalls.

mod queue;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hearth_types::{ImageRecord, VmId, VmRecord};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::locks::KeyedLocks;
use crate::ports::{Fetch, Job, Jobs, Outcome};
use crate::{Error, Options, Reconciler, Result};
use queue::DelayQueue;

/// The label that ties a VM to its owner (a Flintlock microVM's uid).
pub const OWNER_LABEL: &str = "hearth.flintlock/uid";
/// Kernels imported for owners are named after this prefix and their image's id.
pub const KERNEL_PREFIX: &str = "fl-";

/// How often, and how far apart, failed attempts are tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// The wait after the first failure; it doubles with each one after.
    pub first: Duration,
    /// The longest wait between two attempts.
    pub cap: Duration,
    /// Failed attempts before the job is failed for good.
    pub max_failures: u32,
}

impl Default for RetryPolicy {
    /// 2 s, 4 s, ... 60 s between attempts, for about half an hour: long enough for a node
    /// image of a few GB over a slow registry, or a registry that restarts.
    fn default() -> Self {
        Self { first: Duration::from_secs(2), cap: Duration::from_secs(60), max_failures: 36 }
    }
}

impl RetryPolicy {
    /// The wait after the `failures`th failure.
    pub fn delay(&self, failures: u32) -> Duration {
        let doubled = self.first.saturating_mul(1 << failures.saturating_sub(1).min(20));
        doubled.min(self.cap)
    }
}

/// What the queue holds: an attempt at one owner's provisioning or deletion.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Work {
    Provision(String),
    Delete(String),
}

/// Runs provisioning and deletion for owners; see the module's comment.
pub struct Provisioner {
    reconciler: Arc<Reconciler>,
    jobs: Arc<dyn Jobs>,
    fetch: Arc<dyn Fetch>,
    policy: RetryPolicy,
    queue: DelayQueue<Work>,
    /// One lock per owner: its attempts and its deletion never interleave.
    locks: KeyedLocks<String>,
    /// Serialises kernel imports (owners often share one kernel image).
    kernels: tokio::sync::Mutex<()>,
    /// Set when an owner's deletion begins, so its attempt in flight stops waiting on pulls.
    deleting: Mutex<HashMap<String, watch::Sender<bool>>>,
    /// Failed deletions per owner, for their back-off.
    delete_failures: Mutex<HashMap<String, u32>>,
}

impl std::fmt::Debug for Provisioner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provisioner").field("policy", &self.policy).finish_non_exhaustive()
    }
}

impl Provisioner {
    /// A provisioner and its scheduler task (on the current tokio runtime).
    pub fn start(
        reconciler: Arc<Reconciler>,
        jobs: Arc<dyn Jobs>,
        fetch: Arc<dyn Fetch>,
        policy: RetryPolicy,
    ) -> Arc<Self> {
        let me = Arc::new(Self {
            reconciler,
            jobs,
            fetch,
            policy,
            queue: DelayQueue::new(),
            locks: KeyedLocks::default(),
            kernels: tokio::sync::Mutex::const_new(()),
            deleting: Mutex::new(HashMap::new()),
            delete_failures: Mutex::new(HashMap::new()),
        });
        // The scheduler lives as long as the runtime: the daemon's.
        let scheduler = me.clone();
        tokio::spawn(async move {
            loop {
                let work = scheduler.queue.next().await;
                let me = scheduler.clone();
                tokio::spawn(async move { me.run(work).await });
            }
        });
        me
    }

    /// Queues an attempt at `owner`'s provisioning now (a new owner, or one a restart found
    /// pending).
    pub fn submit(&self, owner: &str) {
        self.queue.push(Work::Provision(owner.to_owned()), Instant::now());
    }

    /// Deletes `owner`, whose record is already marked as being deleted: its attempt in flight
    /// stops, then its VM and record go. Retried with back-off until it succeeds.
    pub fn delete(&self, owner: &str) {
        if let Some(tx) = self.deleting.lock().unwrap_or_else(|e| e.into_inner()).get(owner) {
            tx.send_replace(true);
        }
        self.queue.push(Work::Delete(owner.to_owned()), Instant::now());
    }

    /// The VM of an owner, if it exists.
    pub fn vm_of(&self, owner: &str) -> Result<Option<VmRecord>> {
        let vms = self.reconciler.ports.repo.list()?;
        Ok(vms.into_iter().find(|r| r.spec.labels.get(OWNER_LABEL).is_some_and(|u| u == owner)))
    }

    async fn run(&self, work: Work) {
        match work {
            Work::Provision(owner) => self.attempt(&owner).await,
            Work::Delete(owner) => match self.delete_now(&owner).await {
                Ok(()) => {
                    self.delete_failures.lock().unwrap_or_else(|e| e.into_inner()).remove(&owner);
                    info!(owner, "deleted");
                }
                Err(e) => {
                    let failures = {
                        let mut map =
                            self.delete_failures.lock().unwrap_or_else(|e| e.into_inner());
                        let n = map.entry(owner.clone()).or_default();
                        *n += 1;
                        *n
                    };
                    warn!(owner, failures, error = %e, "deleting failed; retrying");
                    let due = Instant::now() + self.policy.delay(failures);
                    self.queue.push(Work::Delete(owner), due);
                }
            },
        }
    }

    /// One attempt, under the owner's lock; queues the next one when it may pass.
    async fn attempt(&self, owner: &str) {
        let lock = self.locks.get(&owner.to_owned());
        let _g = lock.lock().await;
        let (failures, result) = match self.jobs.pending(owner) {
            Ok(None) => return,
            Ok(Some(job)) => (job.failures, self.provision(owner, job).await),
            Err(e) => (0, Err(e)),
        };
        let outcome = match result {
            Ok(vm) => {
                info!(owner, vm = %vm, "provisioned");
                Outcome::Created
            }
            Err(e) => {
                let failures = failures + 1;
                let reason = e.message().to_owned();
                if e.is_retryable() && failures < self.policy.max_failures {
                    warn!(owner, failures, reason, "provisioning failed; retrying");
                    Outcome::Retrying { failures, reason }
                } else {
                    let reason = if e.is_retryable() {
                        format!("gave up after {failures} attempts: {reason}")
                    } else {
                        reason
                    };
                    warn!(owner, reason, "provisioning failed");
                    Outcome::Failed { failures, reason }
                }
            }
        };
        let retry = match (&outcome, self.jobs.record(owner, &outcome)) {
            (Outcome::Retrying { failures, .. }, Ok(())) => Some(*failures),
            (_, Ok(())) => None,
            (_, Err(e)) => {
                // Whatever the attempt did is idempotent: the next one finds it done.
                warn!(owner, error = %e, "recording the outcome failed; trying again");
                Some(failures + 1)
            }
        };
        if let Some(failures) = retry {
            let due = Instant::now() + self.policy.delay(failures);
            self.queue.push(Work::Provision(owner.to_owned()), due);
        }
    }

    /// Fetches what `job` needs, creates its VM (unless it exists) and starts it.
    async fn provision(&self, owner: &str, mut job: Job) -> Result<VmId> {
        let kernel = self.kernel(owner, &job).await?;
        if let Some((image, file)) = &job.initrd {
            let img = self.until_deleted(owner, self.fetch.pull(image)).await?;
            let digest = self
                .fetch
                .import_initrd(&img, file)
                .await
                .map_err(|e| e.context(format!("initrd image {image}")))?;
            job.vm.initrd = Some(digest);
        }
        for image in &job.images {
            self.until_deleted(owner, self.fetch.pull(image)).await?;
        }
        self.check_not_deleting(owner)?;
        let vm = match self.vm_of(owner)? {
            Some(vm) => vm,
            None => {
                job.vm.kernel = Some(kernel);
                job.vm.labels.insert(OWNER_LABEL.into(), owner.into());
                self.reconciler.create(job.vm).await?
            }
        };
        self.check_not_deleting(owner)?;
        if !vm.status.state.is_active() {
            self.reconciler.start(&vm.spec.id).await?;
        }
        Ok(vm.spec.id)
    }

    /// The store name of the job's kernel, imported once from its image.
    async fn kernel(&self, owner: &str, job: &Job) -> Result<String> {
        let image = self.until_deleted(owner, self.fetch.pull(&job.kernel_image)).await?;
        self.check_not_deleting(owner)?;
        let file = job.kernel_file.as_deref().filter(|f| !f.is_empty());
        let name = kernel_name(&image, file);
        let _k = self.kernels.lock().await;
        if !self.reconciler.ports.kernels.exists(&name)? {
            self.fetch
                .import_kernel(&image, file, &name)
                .await
                .map_err(|e| e.context(format!("kernel image {}", job.kernel_image)))?;
        }
        Ok(name)
    }

    /// Runs `work` (a pull) until it ends or the owner's deletion begins, whichever is first.
    /// Left behind, a pull only fills the image store.
    async fn until_deleted<T>(
        &self,
        owner: &str,
        work: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        let mut deleting = {
            let mut map = self.deleting.lock().unwrap_or_else(|e| e.into_inner());
            map.entry(owner.to_owned()).or_insert_with(|| watch::channel(false).0).subscribe()
        };
        // A delete that began before the subscription is seen in the record.
        self.check_not_deleting(owner)?;
        tokio::select! {
            r = work => r,
            _ = deleting.wait_for(|d| *d) => Err(being_deleted()),
        }
    }

    fn check_not_deleting(&self, owner: &str) -> Result<()> {
        if self.jobs.deleting(owner)? {
            return Err(being_deleted());
        }
        Ok(())
    }

    /// Removes the owner's VM (stopping it), then its record.
    async fn delete_now(&self, owner: &str) -> Result<()> {
        let lock = self.locks.get(&owner.to_owned());
        let _g = lock.lock().await;
        if let Some(vm) = self.vm_of(owner)? {
            let deleted = hearth_types::Desired::Deleted;
            self.reconciler.set_desired(&vm.spec.id, deleted, Options::default()).await?;
        }
        self.jobs.remove(owner)?;
        self.locks.forget(&owner.to_owned());
        self.deleting.lock().unwrap_or_else(|e| e.into_inner()).remove(owner);
        Ok(())
    }
}

fn being_deleted() -> Error {
    Error::precondition("it is being deleted")
}

/// A kernel's store name: its image's id, and the file when it is not Ignite's layout.
pub fn kernel_name(image: &ImageRecord, file: Option<&str>) -> String {
    let id = &image.id.hex()[..12];
    match file {
        None => format!("{KERNEL_PREFIX}{id}"),
        Some(f) => {
            let slug: String =
                f.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
            let mut n = format!("{KERNEL_PREFIX}{id}-{}", slug.trim_matches('-'));
            n.truncate(63);
            n
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_back_off_doubles_up_to_its_cap_and_lasts_about_half_an_hour() {
        let p = RetryPolicy::default();
        let waits: Vec<u64> = (1..=7).map(|n| p.delay(n).as_secs()).collect();
        assert_eq!(waits, [2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(p.delay(u32::MAX), p.cap, "no overflow at huge counts");
        let total: Duration = (1..p.max_failures).map(|n| p.delay(n)).sum();
        assert!((25 * 60..40 * 60).contains(&total.as_secs()), "{total:?}");
    }
}

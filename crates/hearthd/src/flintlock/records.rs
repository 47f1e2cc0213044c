//! The microVM records: one JSON file per uid under `ROOT/flintlock/`.

use super::*;

/// Where a microVM's life stands, as persisted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum Phase {
    /// Images being pulled, VM being created.
    Pending,
    /// The hearth VM exists and was started: its state is the microVM's.
    Created,
    /// Provisioning gave up; `reason` says why.
    Failed,
    /// Delete requested; the record goes once the VM is gone.
    Deleting,
}

/// A microVM's persisted intent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Record {
    pub(super) uid: String,
    /// The spec as accepted (uid and instance_id filled in), protobuf-encoded in base64: echoed
    /// back field for field.
    pub(super) spec: String,
    pub(super) phase: Phase,
    #[serde(default)]
    pub(super) reason: String,
    #[serde(default)]
    pub(super) retry: i32,
    pub(super) created_at: u64,
    pub(super) updated_at: u64,
    /// Flintlock's `version`: one more each time what Get reports of the microVM changes.
    #[serde(default)]
    pub(super) version: i32,
    /// A fingerprint of the status last reported at `version`.
    #[serde(default)]
    pub(super) reported: String,
}

impl Record {
    pub(super) fn spec(&self) -> fl::MicroVmSpec {
        let bytes =
            base64::engine::general_purpose::STANDARD.decode(&self.spec).unwrap_or_default();
        fl::MicroVmSpec::decode(bytes.as_slice()).unwrap_or_default()
    }
}

/// The microVM records, one JSON file per uid.
#[derive(Debug)]
pub(super) struct Records {
    pub(super) dir: PathBuf,
    /// Serialises read-modify-write of records.
    pub(super) write: Mutex<()>,
}

impl Records {
    pub(super) fn path(&self, uid: &str) -> PathBuf {
        self.dir.join(format!("{uid}.json"))
    }

    pub(super) fn get(&self, uid: &str) -> Result<Option<Record>, Status> {
        if uid.is_empty() || !uid.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Ok(None);
        }
        match std::fs::read(self.path(uid)) {
            Ok(b) => serde_json::from_slice(&b).map(Some).map_err(internal),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(internal(e)),
        }
    }

    pub(super) fn save(&self, rec: &mut Record) -> Result<(), Status> {
        rec.updated_at = now_secs();
        let bytes = serde_json::to_vec_pretty(rec).map_err(internal)?;
        hearth_store::atomic_write(&self.path(&rec.uid), &bytes).map_err(internal)
    }

    /// Reads, changes and saves a record as one step against other updates. A record marked for
    /// deletion keeps that mark whatever `change` does. `None` when there is no such record.
    pub(super) fn update(
        &self,
        uid: &str,
        change: impl FnOnce(&mut Record),
    ) -> Result<Option<Record>, Status> {
        let _g = self.write.lock().unwrap_or_else(|e| e.into_inner());
        let Some(mut rec) = self.get(uid)? else { return Ok(None) };
        let deleting = rec.phase == Phase::Deleting;
        change(&mut rec);
        if deleting {
            rec.phase = Phase::Deleting;
        }
        self.save(&mut rec)?;
        Ok(Some(rec))
    }

    /// Removes a record; under the same lock as [`Records::update`], so an update racing the
    /// removal can never write the record back.
    pub(super) fn remove(&self, uid: &str) -> Result<(), Status> {
        let _g = self.write.lock().unwrap_or_else(|e| e.into_inner());
        match std::fs::remove_file(self.path(uid)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(internal(e)),
            _ => Ok(()),
        }
    }

    pub(super) fn list(&self) -> Result<Vec<Record>, Status> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.dir).map_err(internal)?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(uid) = name.strip_suffix(".json") {
                match self.get(uid) {
                    Ok(Some(r)) => out.push(r),
                    Ok(None) => {}
                    // One unreadable record must not hide every other microVM.
                    Err(e) => {
                        warn!(uid, error = %e.message(), "skipping an unreadable microvm record")
                    }
                }
            }
        }
        out.sort_by(|a, b| a.uid.cmp(&b.uid));
        Ok(out)
    }
}

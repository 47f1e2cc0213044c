//! The `MicroVM` gRPC service.

use super::*;

#[tonic::async_trait]
impl MicroVm for Flintlock {
    async fn create_micro_vm(
        &self,
        req: Request<fpb::CreateMicroVmRequest>,
    ) -> Result<Response<fpb::CreateMicroVmResponse>, Status> {
        let spec = req
            .into_inner()
            .microvm
            .ok_or_else(|| Status::invalid_argument("microvm spec is required"))?;
        let parent = self.inner.d.parent_iface.as_deref();
        let mut spec = validate(spec, Nets::new(self.inner.network, parent))?;
        for v in &spec.additional_volumes {
            let dir = super::convert::volume_share(v);
            if !dir.is_empty() {
                super::convert::share_path(dir, &self.inner.d.virtiofs_roots)
                    .map_err(Status::invalid_argument)?;
            }
        }
        let requested = spec.clone();
        let uid = ulid::Ulid::new().to_string();
        spec.uid = Some(uid.clone());
        inject_instance_id(&mut spec, &uid)?;
        // Fill in the MAC now, so the card keeps it for the VM's life and the client sees it.
        for i in &mut spec.interfaces {
            if i.guest_mac.as_deref().unwrap_or("").is_empty() {
                let bytes: [u8; 5] = rand::random();
                i.guest_mac = Some(format!(
                    "02:{}",
                    bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
                ));
            }
        }
        let mut rec = Record {
            uid: uid.clone(),
            spec: base64::engine::general_purpose::STANDARD.encode(spec.encode_to_vec()),
            phase: Phase::Pending,
            reason: String::new(),
            retry: 0,
            created_at: now_secs(),
            updated_at: 0,
            version: 0,
            reported: String::new(),
        };
        {
            let _g = self.inner.create.lock().await;
            if let Some(other) = self.records_in(&spec.namespace, Some(&spec.id))?.first() {
                let name = format!("{}/{}", spec.namespace, spec.id);
                if other.phase != Phase::Deleting && same_spec(requested, other)? {
                    // A retry of a create whose answer the client lost (CAPMVM does so when it
                    // could not record the uid): the microVM it made.
                    info!(uid = other.uid, namespace = %spec.namespace, name = %spec.id, "create repeated: the microvm exists");
                    let vm = self.vm_of(&other.uid)?;
                    let microvm = self.microvm(other, vm.as_ref());
                    return Ok(Response::new(fpb::CreateMicroVmResponse {
                        microvm: Some(microvm),
                    }));
                }
                return Err(if other.phase == Phase::Deleting {
                    // Its VM still holds the name and address: a retry after it is gone succeeds.
                    Status::unavailable(format!(
                        "microvm {name} (uid {}) is being deleted; create it again once it is gone",
                        other.uid
                    ))
                } else {
                    Status::already_exists(format!(
                        "microvm {name} already exists (uid {}) with another spec; delete it or choose another id",
                        other.uid
                    ))
                });
            }
            self.reserve_address(&spec, &uid)?;
            if let Err(e) = self.inner.records.save(&mut rec) {
                release_address(&self.inner.d, &uid);
                return Err(e);
            }
        }
        info!(uid, namespace = %spec.namespace, name = %spec.id, "microvm accepted");
        self.inner.provisioner.submit(&uid);
        // A new record has no VM yet: the answer is PENDING, as Flintlock's.
        Ok(Response::new(fpb::CreateMicroVmResponse { microvm: Some(self.microvm(&rec, None)) }))
    }

    async fn delete_micro_vm(
        &self,
        req: Request<fpb::DeleteMicroVmRequest>,
    ) -> Result<Response<pbjson_types::Empty>, Status> {
        let uid = req.into_inner().uid;
        if uid.is_empty() {
            return Err(empty_uid());
        }
        self.inner
            .records
            .update(&uid, |rec| rec.phase = Phase::Deleting)?
            .ok_or_else(|| not_found(&uid))?;
        // Deleting is idempotent: a repeated Delete queues it again.
        self.inner.provisioner.delete(&uid);
        Ok(Response::new(pbjson_types::Empty {}))
    }

    async fn get_micro_vm(
        &self,
        req: Request<fpb::GetMicroVmRequest>,
    ) -> Result<Response<fpb::GetMicroVmResponse>, Status> {
        let uid = req.into_inner().uid;
        if uid.is_empty() {
            return Err(empty_uid());
        }
        let rec = self.inner.records.get(&uid)?.ok_or_else(|| not_found(&uid))?;
        let vm = self.vm_of(&uid)?;
        Ok(Response::new(fpb::GetMicroVmResponse {
            microvm: Some(self.microvm(&rec, vm.as_ref())),
        }))
    }

    async fn list_micro_v_ms(
        &self,
        req: Request<fpb::ListMicroVMsRequest>,
    ) -> Result<Response<fpb::ListMicroVMsResponse>, Status> {
        let req = req.into_inner();
        let name = req.name.as_deref().filter(|n| !n.is_empty());
        let list = self.records_in(&req.namespace, name)?;
        let microvm = self.microvms(&list)?;
        Ok(Response::new(fpb::ListMicroVMsResponse { microvm }))
    }

    type ListMicroVMsStreamStream = Streamed<fpb::ListMessage>;
    async fn list_micro_v_ms_stream(
        &self,
        req: Request<fpb::ListMicroVMsRequest>,
    ) -> Result<Response<Self::ListMicroVMsStreamStream>, Status> {
        let req = req.into_inner();
        if req.namespace.is_empty() {
            return Err(Status::invalid_argument("namespace is required"));
        }
        let list = self.records_in(&req.namespace, None)?;
        let items: Vec<Result<fpb::ListMessage, Status>> = self
            .microvms(&list)?
            .into_iter()
            .map(|m| Ok(fpb::ListMessage { microvm: Some(m) }))
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(items))))
    }
}

/// Whether `requested` (validated, before a uid was given) asks for what `existing` is: the
/// same spec once given the existing uid, the interfaces' MACs aside (CAPMVM makes new ones
/// for each attempt).
fn same_spec(mut requested: fl::MicroVmSpec, existing: &Record) -> Result<bool, Status> {
    requested.uid = Some(existing.uid.clone());
    inject_instance_id(&mut requested, &existing.uid)?;
    let mut existing = existing.spec();
    for spec in [&mut requested, &mut existing] {
        for i in &mut spec.interfaces {
            i.guest_mac = None;
        }
        (spec.created_at, spec.updated_at) = (None, None);
    }
    Ok(requested == existing)
}

/// An empty uid: INVALID_ARGUMENT, its text saying "not found" as CAPMVM matches to let go of a
/// machine whose create was refused.
fn empty_uid() -> Status {
    Status::invalid_argument("uid is required: a microvm with an empty uid is not found")
}

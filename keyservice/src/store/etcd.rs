//! The etcd store: every replica of the service reads and writes one etcd cluster, and
//! every decision that must happen once is one etcd transaction.
//!
//! Keys under the configured prefix `P`:
//!
//! | key | value | lease |
//! |---|---|---|
//! | `P hosts/{host}` | the registry entry (JSON, with its expiry) | none |
//! | `P migrations/{id}` | source, destination, VM, outcome (JSON) | record retention (24 h) |
//! | `P keys/{id}` | the key and nonce **sealed** under the KEK ([`super::kek`]) | key TTL |
//! | `P dest/{id}` | the destination's name, for the fetch to compare | key TTL |
//! | `P fetched/{id}` | a random token: the key was handed out | the record's |
//! | `P requests/{source}/{request id}` | the migration id it created | key TTL |
//! | `P vms/{vm}` | the migration id holding the VM | `in_flight_ttl` |
//! | `P draining/{host}` | empty: the host is in maintenance | none |
//! | `P out/{source}/{id}`, `P in/{destination}/{id}` | empty: admission slots | `in_flight_ttl` |
//!
//! Leases are shared by the writes of a short window (a lease per window instead of one
//! per write), so a key may outlive its TTL in etcd by up to that window; the expiry
//! written beside each sealed key is what `fetch` enforces.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, KeyValue, PutOptions,
    Txn, TxnOp, TxnOpResponse,
};
use serde::{Deserialize, Serialize};
use vmotion_proto::MigrationId;

use super::kek::{Keks, Sealed};
use super::rules::{self, InFlight, Limits, Refused, Step, holds_vm, outcome_step};
use super::state::RECORD_RETENTION;
use super::{Created, Fetched, NewMigration, unix_ms};
use crate::api::{ErrorCode, HostRecord, Outcome, OutcomeRecord, RegisterRequest};
use crate::config::EtcdConfig;
use crate::server::ServeError;

/// Most times a transaction is retried after losing a race before the caller is told to
/// retry.
const MAX_ATTEMPTS: usize = 16;

/// A migration's record in etcd (never key material).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    source: String,
    destination: String,
    vm: String,
    created_ms: u64,
    outcome: Option<Outcome>,
    recorded_at_ms: Option<u64>,
}

impl Record {
    fn answer(&self, id: MigrationId) -> OutcomeRecord {
        OutcomeRecord {
            migration_id: id.to_string(),
            source: self.source.clone(),
            destination: self.destination.clone(),
            vm: self.vm.clone(),
            outcome: self.outcome,
            recorded_at_ms: self.recorded_at_ms,
        }
    }
}

/// Leases shared by the writes of one window, per TTL.
#[derive(Default)]
struct Leases {
    by_ttl: tokio::sync::Mutex<HashMap<u64, (i64, Instant)>>,
}

/// The window over which writes of one TTL share a lease.
fn window(ttl: Duration) -> Duration {
    (ttl / 60).clamp(Duration::from_secs(1), Duration::from_secs(60))
}

/// The etcd store.
pub(crate) struct EtcdStore {
    client: Client,
    prefix: String,
    keks: Keks,
    limits: Limits,
    key_ttl: Duration,
    registry_ttl: Duration,
    timeout: Duration,
    leases: Leases,
    rng: ring::rand::SystemRandom,
}

fn unavailable(e: impl std::fmt::Display) -> Refused {
    tracing::warn!(error = %e, "etcd request failed");
    Refused::new(
        ErrorCode::Unavailable,
        format!("the key service's etcd cluster did not answer ({e}); retry"),
    )
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> Refused {
    tracing::error!(error = %e, what, "unreadable value in etcd");
    Refused::new(ErrorCode::Internal, format!("an unreadable {what} in etcd"))
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The responses of a read-only transaction, in order.
fn gets(responses: Vec<TxnOpResponse>) -> Vec<etcd_client::GetResponse> {
    responses
        .into_iter()
        .filter_map(|r| match r {
            TxnOpResponse::Get(g) => Some(g),
            _ => None,
        })
        .collect()
}

fn first(g: &etcd_client::GetResponse) -> Option<&KeyValue> {
    g.kvs().first()
}

impl EtcdStore {
    /// Connects (lazily: an unreachable cluster is reported, and served as `unavailable`
    /// until it answers) and loads the KEKs.
    pub(crate) async fn open(
        config: &EtcdConfig,
        limits: Limits,
        key_ttl: Duration,
        registry_ttl: Duration,
    ) -> Result<Self, ServeError> {
        let keks = Keks::load(&config.kek, &config.previous_keks).map_err(ServeError::Store)?;
        // One attempt gets a third of the request's time, so a request stuck on a member
        // that just died is sent again (to another) within the request's deadline.
        let attempt = attempt_timeout(config.request_timeout);
        let mut options = ConnectOptions::new()
            .with_timeout(attempt)
            .with_connect_timeout(attempt)
            .with_keep_alive(Duration::from_millis(500), attempt);
        if let Some((ca, cert, key)) = &config.tls {
            options = options.with_tls(tls_options(ca, cert, key)?);
        }
        let client = Client::connect(&config.endpoints, Some(options))
            .await
            .map_err(|e| ServeError::Store(format!("etcd at {:?}: {e}", config.endpoints)))?;
        let store = Self {
            client,
            prefix: config.prefix.clone(),
            keks,
            limits,
            key_ttl,
            registry_ttl,
            timeout: config.request_timeout,
            leases: Leases::default(),
            rng: ring::rand::SystemRandom::new(),
        };
        match store.client.clone().status().await {
            Ok(s) => tracing::info!(
                etcd_version = s.version(),
                endpoints = ?config.endpoints,
                prefix = %store.prefix,
                kek = store.keks.current_id(),
                "etcd store ready"
            ),
            Err(e) => {
                tracing::warn!(error = %e, endpoints = ?config.endpoints, "etcd does not answer yet; serving `unavailable` until it does")
            }
        }
        Ok(store)
    }

    fn key(&self, parts: &[&str]) -> String {
        let mut k = self.prefix.clone();
        k.push_str(&parts.join("/"));
        k
    }

    /// Runs `txn`, sending it again after an error until the request timeout has passed
    /// (a member down, a leader election). Every transaction here is guarded by its
    /// compares or is idempotent, so one that landed without its answer does no harm
    /// when sent again: the callers tell "it was mine" from "another won".
    async fn txn(&self, txn: Txn) -> Result<etcd_client::TxnResponse, Refused> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut pause = Duration::from_millis(20);
        loop {
            let mut client = self.client.clone();
            let now = tokio::time::Instant::now();
            let cut = deadline.min(now + attempt_timeout(self.timeout));
            let error = match tokio::time::timeout_at(cut, client.txn(txn.clone())).await {
                Ok(Ok(r)) => return Ok(r),
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer within {:?}", attempt_timeout(self.timeout)),
            };
            if tokio::time::Instant::now() + pause >= deadline {
                return Err(unavailable(error));
            }
            tracing::debug!(%error, "etcd request failed; sending it again");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }

    /// A get of `key` (a count of the prefix `key`, with `count`). `local` reads the
    /// member's own copy (serializable: no round of the leader, possibly a little behind):
    /// fine to decide a write that compares what it read, never to refuse or to answer.
    fn get(key: impl Into<Vec<u8>>, count: bool, local: bool) -> TxnOp {
        let mut o = GetOptions::new();
        if count {
            o = o.with_prefix().with_count_only();
        }
        if local {
            o = o.with_serializable();
        }
        TxnOp::get(key, Some(o))
    }

    /// Reads several keys (or counts prefixes) at one revision.
    async fn read(&self, ops: Vec<TxnOp>) -> Result<(i64, Vec<etcd_client::GetResponse>), Refused> {
        let mut r = self.txn(Txn::new().and_then(ops)).await?;
        let rev = r.take_header().map_or(0, |h| h.revision());
        Ok((rev, gets(r.op_responses())))
    }

    /// A lease for writes that must live `ttl`, shared within its window.
    async fn lease(&self, ttl: Duration) -> Result<i64, Refused> {
        let w = window(ttl);
        let mut leases = self.leases.by_ttl.lock().await;
        let secs = ttl.as_secs().max(1);
        if let Some(&(id, at)) = leases.get(&secs)
            && at.elapsed() < w
        {
            return Ok(id);
        }
        let grant_ttl = i64::try_from(secs + w.as_secs() + 1).unwrap_or(i64::MAX);
        let mut client = self.client.clone();
        let granted = tokio::time::timeout(self.timeout, client.lease_grant(grant_ttl, None))
            .await
            .map_err(|_| unavailable(format!("no lease within {:?}", self.timeout)))?
            .map_err(unavailable)?;
        leases.insert(secs, (granted.id(), Instant::now()));
        Ok(granted.id())
    }

    pub(crate) async fn register(
        &self,
        caller: &str,
        req: RegisterRequest,
    ) -> Result<HostRecord, Refused> {
        let record = HostRecord {
            host: caller.to_owned(),
            can_encrypt: req.can_encrypt,
            protocol_versions: req.protocol_versions,
            ciphers: req.ciphers,
            expires_at_ms: unix_ms() + ms(self.registry_ttl),
        };
        let value = serde_json::to_vec(&record).expect("serializes");
        self.txn(Txn::new().and_then([TxnOp::put(self.key(&["hosts", caller]), value, None)]))
            .await?;
        Ok(record)
    }

    /// Puts `host` in maintenance (`P draining/{host}`, no lease) or takes it out.
    pub(crate) async fn set_draining(&self, host: &str, draining: bool) -> Result<(), Refused> {
        let key = self.key(&["draining", host]);
        let op = if draining {
            TxnOp::put(key, "", None)
        } else {
            TxnOp::delete(key, None)
        };
        self.txn(Txn::new().and_then([op])).await.map(drop)
    }

    /// Whether `host` is in maintenance (a linearizable read).
    pub(crate) async fn is_draining(&self, host: &str) -> Result<bool, Refused> {
        let (_, got) = self
            .read(vec![TxnOp::get(self.key(&["draining", host]), None)])
            .await?;
        Ok(got.first().and_then(first).is_some())
    }

    pub(crate) async fn host(&self, host: &str) -> Result<Option<HostRecord>, Refused> {
        let (_, got) = self
            .read(vec![TxnOp::get(self.key(&["hosts", host]), None)])
            .await?;
        Self::live_host(got.first())
    }

    fn live_host(got: Option<&etcd_client::GetResponse>) -> Result<Option<HostRecord>, Refused> {
        let Some(kv) = got.and_then(first) else {
            return Ok(None);
        };
        let record: HostRecord =
            serde_json::from_slice(kv.value()).map_err(|e| corrupt("host record", e))?;
        Ok((record.expires_at_ms > unix_ms()).then_some(record))
    }

    async fn record(
        &self,
        id: MigrationId,
        local: bool,
    ) -> Result<Option<(Record, KeyValue)>, Refused> {
        let key = self.key(&["migrations", &id.to_string()]);
        let (_, got) = self.read(vec![Self::get(key, false, local)]).await?;
        let Some(kv) = got.first().and_then(first).cloned() else {
            return Ok(None);
        };
        let record =
            serde_json::from_slice(kv.value()).map_err(|e| corrupt("migration record", e))?;
        Ok(Some((record, kv)))
    }

    pub(crate) async fn create(&self, new: NewMigration<'_>) -> Result<Created, Refused> {
        rules::check_create(new.caller, new.vm, new.destination)?;
        if self.limits.counts_nothing()
            && let Some(created) = self.create_at_once(&new).await?
        {
            return Ok(created);
        }
        let mut abort_stale = new.abort_stale;
        for attempt in 0..MAX_ATTEMPTS {
            match self.try_create(&new, abort_stale, attempt == 0).await? {
                Attempt::Done(created) => return Ok(*created),
                Attempt::Raced => {}
                Attempt::AbortedStale => abort_stale = false,
            }
        }
        Err(Refused::new(
            ErrorCode::Unavailable,
            "too many concurrent creates raced for the same VM or slots; retry",
        ))
    }

    /// One read-decide-write round of a create.
    async fn try_create(
        &self,
        new: &NewMigration<'_>,
        abort_stale: bool,
        local: bool,
    ) -> Result<Attempt, Refused> {
        let (caller, destination) = (new.caller, new.destination);
        let rid = new.request.map(hex::encode);
        let vm_key = self.key(&["vms", new.vm]);
        let out_prefix = self.key(&["out", caller, ""]);
        let in_prefix = self.key(&["in", destination, ""]);
        let vms_prefix = self.key(&["vms", ""]);
        // A count walks its whole range in etcd's index: only where a limit applies (else
        // a get of one absent key keeps the positions, and the count is 0).
        let l = self.limits;
        let mut ops = vec![
            Self::get(vm_key.clone(), false, local),
            Self::get(out_prefix.clone(), l.outbound_per_host != 0, local),
            Self::get(in_prefix.clone(), l.inbound_per_host != 0, local),
            Self::get(vms_prefix.clone(), l.cluster != 0, local),
            Self::get(self.key(&["hosts", destination]), false, local),
        ];
        let request_key = rid.as_ref().map(|r| self.key(&["requests", caller, r]));
        // Always at index 5, so that the request (when any) is at 6.
        ops.push(Self::get(
            self.key(&["draining", destination]),
            false,
            local,
        ));
        if let Some(k) = &request_key {
            ops.push(Self::get(k.clone(), false, local));
        }
        let (rev, got) = self.read(ops).await?;
        let draining = got.get(5).and_then(first).is_some();
        let counted = InFlight {
            source: count_of(&got[1]),
            destination: count_of(&got[2]),
            cluster: count_of(&got[3]),
        };
        let clear = got.first().and_then(first).is_none()
            && got.get(6).and_then(first).is_none()
            && !draining
            && self.limits.admit(counted, caller, destination).is_ok();
        if local && !clear {
            return Ok(Attempt::Raced); // decide that on a fresh read
        }
        let dest_record = Self::live_host(got.get(4))?;
        if let Some(kv) = got.get(6).and_then(first) {
            let id = rules::parse_id(&String::from_utf8_lossy(kv.value()))?;
            return self
                .created_again(id, new, dest_record)
                .await
                .map(|c| Attempt::Done(Box::new(c)));
        }
        if let Some(kv) = got.first().and_then(first) {
            let holder = rules::parse_id(&String::from_utf8_lossy(kv.value()))?;
            if holder == new.id {
                // Our own transaction landed; its answer was lost on the way.
                return Ok(Attempt::Done(Box::new(self.fresh(
                    new,
                    dest_record,
                    counted,
                ))));
            }
            return self.stale_or_refused(new, holder, abort_stale).await;
        }
        if draining {
            return Err(rules::draining(destination));
        }
        self.limits.admit(counted, caller, destination)?;
        let (when, then) = self.create_writes(new, Some(rev)).await?;
        let r = self.txn(Txn::new().when(when).and_then(then)).await?;
        if !r.succeeded() {
            return Ok(Attempt::Raced);
        }
        let counted = InFlight {
            source: counted.source + 1,
            destination: counted.destination + 1,
            cluster: counted.cluster + 1,
        };
        Ok(Attempt::Done(Box::new(self.fresh(
            new,
            dest_record,
            counted,
        ))))
    }

    /// A create with no count to read: one transaction that writes if the VM is free and
    /// the id and the request id are new, and reads the destination's registry entry.
    /// `None` when a compare failed: the read-decide-write rounds tell why.
    async fn create_at_once(&self, new: &NewMigration<'_>) -> Result<Option<Created>, Refused> {
        let (when, mut then) = self.create_writes(new, None).await?;
        then.push(TxnOp::get(self.key(&["hosts", new.destination]), None));
        let r = self.txn(Txn::new().when(when).and_then(then)).await?;
        if !r.succeeded() {
            return Ok(None);
        }
        let dest_record = Self::live_host(gets(r.op_responses()).first())?;
        let one = InFlight {
            source: 1,
            destination: 1,
            cluster: 1,
        };
        Ok(Some(self.fresh(new, dest_record, one)))
    }

    /// The compares and writes of a create: the VM is free, the id and the request id are
    /// new, and (with `counted_at`, the revision the counts were read at) no slot of a
    /// limited scope was taken since → the record, the sealed key, the destination's
    /// name for the fetch to compare, the request, the VM lock and the slots.
    async fn create_writes(
        &self,
        new: &NewMigration<'_>,
        counted_at: Option<i64>,
    ) -> Result<(Vec<Compare>, Vec<TxnOp>), Refused> {
        let (caller, destination) = (new.caller, new.destination);
        let vm_key = self.key(&["vms", new.vm]);
        let id = new.id;
        let id_hex = id.to_string();
        let now_ms = unix_ms();
        let expires_at_ms = now_ms + ms(self.key_ttl);
        let sealed = self
            .keks
            .seal(id, &new.key, &new.nonce, expires_at_ms, &self.rng)
            .map_err(|e| Refused::new(ErrorCode::Internal, e))?;
        let (key_lease, flight_lease, record_lease) = (
            self.lease(self.key_ttl).await?,
            self.lease(self.limits.in_flight_ttl).await?,
            self.lease(RECORD_RETENTION).await?,
        );
        let record = Record {
            source: caller.to_owned(),
            destination: destination.to_owned(),
            vm: new.vm.to_owned(),
            created_ms: now_ms,
            outcome: None,
            recorded_at_ms: None,
        };
        let migration_key = self.key(&["migrations", &id_hex]);
        let mut when = vec![
            Compare::version(self.key(&["draining", destination]), CompareOp::Equal, 0),
            Compare::version(vm_key.clone(), CompareOp::Equal, 0),
            Compare::create_revision(migration_key.clone(), CompareOp::Equal, 0),
        ];
        let scopes = [
            (
                self.limits.outbound_per_host,
                self.key(&["out", caller, ""]),
            ),
            (
                self.limits.inbound_per_host,
                self.key(&["in", destination, ""]),
            ),
            (self.limits.cluster, self.key(&["vms", ""])),
        ];
        for (limit, prefix) in scopes {
            if let Some(rev) = counted_at
                && limit != 0
            {
                // No slot was taken in this range since the counts were read.
                when.push(Compare::mod_revision(prefix, CompareOp::Less, rev + 1).with_prefix());
            }
        }
        let with = |lease| Some(PutOptions::new().with_lease(lease));
        let mut then = vec![
            TxnOp::put(
                migration_key,
                serde_json::to_vec(&record).expect("serializes"),
                with(record_lease),
            ),
            TxnOp::put(
                self.key(&["keys", &id_hex]),
                serde_json::to_vec(&sealed).expect("serializes"),
                with(key_lease),
            ),
            TxnOp::put(self.key(&["dest", &id_hex]), destination, with(key_lease)),
            TxnOp::put(vm_key, id_hex.clone(), with(flight_lease)),
            TxnOp::put(self.key(&["out", caller, &id_hex]), "", with(flight_lease)),
            TxnOp::put(
                self.key(&["in", destination, &id_hex]),
                "",
                with(flight_lease),
            ),
        ];
        if let Some(r) = new.request {
            let k = self.key(&["requests", caller, &hex::encode(r)]);
            when.push(Compare::version(k.clone(), CompareOp::Equal, 0));
            then.push(TxnOp::put(k, id_hex, with(key_lease)));
        }
        Ok((when, then))
    }

    /// The answer to a create that landed.
    fn fresh(
        &self,
        new: &NewMigration<'_>,
        destination: Option<HostRecord>,
        in_flight: InFlight,
    ) -> Created {
        Created {
            id: new.id,
            key: *new.key,
            nonce: new.nonce,
            destination,
            journal: None,
            in_flight,
            expires_at_ms: unix_ms() + ms(self.key_ttl),
        }
    }

    /// A retried create: the migration it made, with the same key while it waits.
    async fn created_again(
        &self,
        id: MigrationId,
        new: &NewMigration<'_>,
        destination: Option<HostRecord>,
    ) -> Result<Created, Refused> {
        let id_hex = id.to_string();
        let (_, got) = self
            .read(vec![
                TxnOp::get(self.key(&["migrations", &id_hex]), None),
                TxnOp::get(self.key(&["keys", &id_hex]), None),
            ])
            .await?;
        let Some(kv) = got.first().and_then(first) else {
            return rules::refuse(
                ErrorCode::Expired,
                format!("migration {id} of this request is gone"),
            );
        };
        let record: Record =
            serde_json::from_slice(kv.value()).map_err(|e| corrupt("migration record", e))?;
        if record.vm != new.vm || record.destination != new.destination {
            return rules::refuse(
                ErrorCode::BadRequest,
                format!(
                    "this request id already created migration {id}, of another VM or destination"
                ),
            );
        }
        let Some(key) = got.get(1).and_then(first) else {
            return rules::refuse(
                ErrorCode::Expired,
                format!("this request already created migration {id}, whose key is no longer held"),
            );
        };
        let sealed: Sealed =
            serde_json::from_slice(key.value()).map_err(|e| corrupt("sealed key", e))?;
        let material = self
            .keks
            .open(id, &sealed)
            .map_err(|e| Refused::new(ErrorCode::Internal, e))?;
        Ok(Created {
            id,
            key: *material.key.expose_secret(),
            nonce: material.nonce.0,
            destination,
            journal: None,
            in_flight: InFlight::default(),
            expires_at_ms: sealed.expires_ms,
        })
    }

    async fn stale_or_refused(
        &self,
        new: &NewMigration<'_>,
        holder: MigrationId,
        abort_stale: bool,
    ) -> Result<Attempt, Refused> {
        let Some((record, _)) = self.record(holder, false).await? else {
            return Ok(Attempt::Raced); // its record expired under the lock: read again
        };
        let detail = format!(" (from {} to {})", record.source, record.destination);
        let own = abort_stale && record.source == new.caller;
        if own && record.outcome.is_none() {
            tracing::info!(stale = %holder, vm = new.vm, "aborting the source's stale migration");
            match self
                .record_outcome(new.caller, holder, Outcome::Aborted)
                .await
            {
                Ok(_) => return Ok(Attempt::AbortedStale),
                Err(Refused(ErrorCode::Conflict, ..)) => return Ok(Attempt::Raced),
                Err(e) => return Err(e),
            }
        }
        let hint = if own {
            "; its outcome is being recorded, retry"
        } else {
            ""
        };
        if !holds_vm(record.outcome) {
            return Ok(Attempt::Raced); // released in the meantime
        }
        Err(rules::vm_in_flight(
            new.vm,
            holder,
            &format!("{detail}{hint}"),
        ))
    }

    /// The single-use key fetch, one transaction: if the caller is the migration's
    /// destination and the key was not handed out, read the record and the sealed key,
    /// delete both the key and the destination's name, and mark it fetched. Otherwise the
    /// same transaction reads why not. An etcd answer lost on the way loses the key with
    /// it (the resent transaction finds this fetch's own marker): the fetch fails
    /// `unavailable` and the migration aborts with its VM at the source, as when the
    /// HTTP answer to a fetch is lost.
    pub(crate) async fn fetch_key(
        &self,
        caller: &str,
        id: MigrationId,
    ) -> Result<Fetched, Refused> {
        let id_hex = id.to_string();
        let [record_key, key_key, fetched_key, dest_key] =
            ["migrations", "keys", "fetched", "dest"].map(|k| self.key(&[k, &id_hex]));
        let token = self.token()?;
        let marker = Some(PutOptions::new().with_lease(self.lease(RECORD_RETENTION).await?));
        let txn = Txn::new()
            .when([
                Compare::value(dest_key.clone(), CompareOp::Equal, caller),
                Compare::version(fetched_key.clone(), CompareOp::Equal, 0),
                Compare::version(key_key.clone(), CompareOp::Greater, 0),
            ])
            .and_then([
                TxnOp::get(record_key.clone(), None),
                TxnOp::get(key_key.clone(), None),
                TxnOp::delete(key_key.clone(), None),
                TxnOp::delete(dest_key, None),
                TxnOp::put(fetched_key.clone(), token.clone(), marker),
            ])
            .or_else([
                TxnOp::get(record_key, None),
                TxnOp::get(key_key, None),
                TxnOp::get(fetched_key.clone(), None),
            ]);
        let r = self.txn(txn).await?;
        let succeeded = r.succeeded();
        let got = gets(r.op_responses());
        if !succeeded
            && got
                .get(2)
                .and_then(first)
                .is_some_and(|kv| kv.value() == token.as_bytes())
        {
            // Our transaction landed and its answer was lost: the key is gone with it.
            return rules::refuse(
                ErrorCode::Unavailable,
                format!(
                    "the key of migration {id} was taken from etcd but etcd's answer was \
                     lost; a key is never handed out twice: start the migration again"
                ),
            );
        }
        let (record, rkv, kkv) = fetchable(id, caller, &got)?;
        if !succeeded {
            // Fetchable, yet the compares failed: a key written without the destination's
            // name (by an older replica): take it with a compare-and-delete.
            return self.take(id, record, &rkv, &kkv).await;
        }
        let sealed: Sealed =
            serde_json::from_slice(kkv.value()).map_err(|e| corrupt("sealed key", e))?;
        if sealed.expires_ms <= unix_ms() {
            // Not handed out: the marker would say "already fetched" to the next caller.
            let del = Txn::new()
                .when([Compare::value(fetched_key.clone(), CompareOp::Equal, token)])
                .and_then([TxnOp::delete(fetched_key, None)]);
            self.txn(del).await?;
            return Err(gone(id, false));
        }
        self.opened(id, record, &sealed)
    }

    /// A fresh random token that names one fetch.
    fn token(&self) -> Result<String, Refused> {
        let mut token = [0u8; 16];
        ring::rand::SecureRandom::fill(&self.rng, &mut token)
            .map_err(|_| Refused::new(ErrorCode::Internal, "the OS random generator failed"))?;
        Ok(hex::encode(token))
    }

    /// The key as the destination gets it.
    fn opened(&self, id: MigrationId, record: Record, sealed: &Sealed) -> Result<Fetched, Refused> {
        let material = self
            .keks
            .open(id, sealed)
            .map_err(|e| Refused::new(ErrorCode::Internal, e))?;
        Ok(Fetched {
            material,
            source: record.source,
            vm: record.vm,
        })
    }

    /// The fetch of a key read in `kkv`: compare-and-delete it, and mark it fetched.
    async fn take(
        &self,
        id: MigrationId,
        record: Record,
        rkv: &KeyValue,
        kkv: &KeyValue,
    ) -> Result<Fetched, Refused> {
        let id_hex = id.to_string();
        let key_key = self.key(&["keys", &id_hex]);
        let sealed: Sealed =
            serde_json::from_slice(kkv.value()).map_err(|e| corrupt("sealed key", e))?;
        let expired = sealed.expires_ms <= unix_ms();
        let token = self.token()?;
        let fetched_key = self.key(&["fetched", &id_hex]);
        let mut then = vec![TxnOp::delete(key_key.clone(), None)];
        if !expired {
            let marker = Some(PutOptions::new().with_lease(rkv.lease()));
            then.push(TxnOp::put(fetched_key.clone(), token.clone(), marker));
        }
        let taken = self
            .txn(
                Txn::new()
                    .when([Compare::mod_revision(
                        key_key,
                        CompareOp::Equal,
                        kkv.mod_revision(),
                    )])
                    .and_then(then),
            )
            .await?;
        if expired {
            return Err(gone(id, false));
        }
        if !taken.succeeded() && !self.marked_by(&fetched_key, &token).await? {
            // Another fetch (or an outcome) took it between the read and the write.
            return Err(gone(id, true));
        }
        self.opened(id, record, &sealed)
    }

    /// Whether the fetch marker is ours: our transaction landed, its answer was lost.
    async fn marked_by(&self, key: &str, token: &str) -> Result<bool, Refused> {
        let (_, got) = self.read(vec![TxnOp::get(key, None)]).await?;
        Ok(got
            .first()
            .and_then(first)
            .is_some_and(|kv| kv.value() == token.as_bytes()))
    }

    pub(crate) async fn record_outcome(
        &self,
        caller: &str,
        id: MigrationId,
        outcome: Outcome,
    ) -> Result<OutcomeRecord, Refused> {
        for attempt in 0..MAX_ATTEMPTS {
            // The first read is the member's own copy: it may only lead to a write that
            // compares it; an answer (a retry's record, a refusal) comes from a fresh one.
            let local = attempt == 0;
            let Some((mut record, kv)) = self.record(id, local).await? else {
                if local {
                    continue;
                }
                return rules::refuse(ErrorCode::NotFound, format!("no migration {id}"));
            };
            let step = outcome_step(
                id,
                (&record.source, &record.destination),
                caller,
                record.outcome,
                outcome,
            );
            if local && step != Ok(Step::Write) {
                continue;
            }
            if step? == Step::Retry {
                return Ok(record.answer(id));
            }
            record.outcome = Some(outcome);
            record.recorded_at_ms = Some(unix_ms());
            let txn = self.outcome_txn(id, &record, kv.mod_revision());
            if self.txn(txn).await?.succeeded() {
                return Ok(record.answer(id));
            }
        }
        Err(Refused::new(
            ErrorCode::Unavailable,
            format!("the outcome of migration {id} is being recorded; read it back"),
        ))
    }

    /// The compare-and-set of one outcome step: the record as read, the new record, the
    /// key dropped, and for the first outcome the VM and the slots given back.
    fn outcome_txn(&self, id: MigrationId, record: &Record, seen: i64) -> Txn {
        let id_hex = id.to_string();
        let migration_key = self.key(&["migrations", &id_hex]);
        let keep_lease = Some(PutOptions::new().with_ignore_lease());
        let mut then = vec![
            TxnOp::put(
                migration_key.clone(),
                serde_json::to_vec(record).expect("serializes"),
                keep_lease,
            ),
            TxnOp::delete(self.key(&["keys", &id_hex]), None::<DeleteOptions>),
            TxnOp::delete(self.key(&["dest", &id_hex]), None),
        ];
        if !holds_vm(record.outcome) {
            let vm_key = self.key(&["vms", &record.vm]);
            then.extend([
                TxnOp::delete(self.key(&["out", &record.source, &id_hex]), None),
                TxnOp::delete(self.key(&["in", &record.destination, &id_hex]), None),
                // Only this migration's lock: it may have expired and been taken since.
                TxnOp::txn(
                    Txn::new()
                        .when([Compare::value(vm_key.clone(), CompareOp::Equal, id_hex)])
                        .and_then([TxnOp::delete(vm_key, None)]),
                ),
            ]);
        }
        Txn::new()
            .when([Compare::mod_revision(migration_key, CompareOp::Equal, seen)])
            .and_then(then)
    }

    pub(crate) async fn outcome(
        &self,
        caller: &str,
        id: MigrationId,
    ) -> Result<OutcomeRecord, Refused> {
        let Some((record, _)) = self.record(id, false).await? else {
            return rules::refuse(ErrorCode::NotFound, format!("no migration {id}"));
        };
        if record.source != caller && record.destination != caller {
            return rules::refuse(
                ErrorCode::Forbidden,
                format!("only migration {id}'s source and destination may read its outcome"),
            );
        }
        Ok(record.answer(id))
    }
}

/// What one round of a create came to.
enum Attempt {
    Done(Box<Created>),
    /// Lost a race (or something changed under the read): read again.
    Raced,
    /// The source's stale migration was aborted: try again, without aborting more.
    AbortedStale,
}

/// What a fetch read: the record and the key, or why it cannot have the key.
fn fetchable(
    id: MigrationId,
    caller: &str,
    got: &[etcd_client::GetResponse],
) -> Result<(Record, KeyValue, KeyValue), Refused> {
    let Some(rkv) = got.first().and_then(first) else {
        return rules::refuse(ErrorCode::NotFound, format!("no migration {id}"));
    };
    let record: Record =
        serde_json::from_slice(rkv.value()).map_err(|e| corrupt("migration record", e))?;
    if record.destination != caller {
        return rules::refuse(
            ErrorCode::Forbidden,
            format!("only migration {id}'s destination may fetch its key"),
        );
    }
    let fetched = got.get(2).and_then(first).is_some();
    let Some(kkv) = got.get(1).and_then(first).filter(|_| !fetched) else {
        return Err(gone(id, fetched));
    };
    Ok((record, rkv.clone(), kkv.clone()))
}

/// The time one etcd request attempt gets out of a request's `timeout`.
fn attempt_timeout(timeout: Duration) -> Duration {
    (timeout / 3).max(Duration::from_millis(100))
}

fn count_of(g: &etcd_client::GetResponse) -> usize {
    usize::try_from(g.count()).unwrap_or(usize::MAX)
}

fn gone(id: MigrationId, fetched: bool) -> Refused {
    if fetched {
        Refused::new(
            ErrorCode::AlreadyFetched,
            format!("the key of migration {id} was already fetched"),
        )
    } else {
        Refused::new(
            ErrorCode::Expired,
            format!("the key of migration {id} expired"),
        )
    }
}

fn tls_options(
    ca: &std::path::Path,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<etcd_client::TlsOptions, ServeError> {
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|e| ServeError::Store(format!("{}: {e}", p.display())))
    };
    Ok(etcd_client::TlsOptions::new()
        .ca_certificate(etcd_client::Certificate::from_pem(read(ca)?))
        .identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?)))
}

//! Keeping strangers off the data plane: the `Auth.Handshake` challenge-response, the
//! session tickets it grants, and the interceptor that checks them.
//!
//! Both ends of a gRPC connection prove they hold the cluster key before any activation
//! flows. Each sends a [`Hello`] with a fresh 32-byte nonce; the server proves itself
//! first, the client only after checking the server's proof, each with HMAC-SHA256 of
//! [`transcript`] for its role, keyed by `SHA-256("hearth-auth-v1" || cluster key)`
//! (never by the cluster key itself, which never crosses the wire). The server then
//! issues a random [`Session`] ticket, remembered until it expires, and every
//! `Pipeline` call carries it in the [`SESSION_METADATA_KEY`] metadata entry, checked
//! by [`SessionCheck`] before any message is decoded.
//!
//! Without a cluster key there is no handshake: the `Auth` service is not served, and
//! `Pipeline` calls need no ticket.
//!
//! Clients go through an [`AuthedChannel`], which shakes hands once per connection,
//! again before the ticket expires, and again after the server refused it. It is made
//! for one peer, and checks, key or no key, that the other end proves that peer's node
//! id ([`crate::peer_identity`]) before the channel is used.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use hearth_mesh::cluster_key::ClusterKey;
use hearth_proto::handshake::{
    transcript, Hello, HandshakeStep, Proof, Role, Session, MAC_LEN, NONCE_LEN, SESSION_METADATA_KEY,
};
use hearth_proto::probe::ProbeAnswer;
use hearth_proto::{pb, Limits};
use hmac::{Hmac, Mac as _};
use rand::Rng as _;
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::metadata::{BinaryMetadataValue, MetadataValue};
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

use crate::peer_identity::{self, NotThePeer};

/// The environment variable that may hold the cluster key, in hex.
pub const CLUSTER_KEY_ENV: &str = "HEARTH_CLUSTER_KEY";

/// Labels the handshake's MAC key among the keys derived from the cluster key.
pub const AUTH_LABEL: &[u8] = b"hearth-auth-v1";

/// How long a session ticket is good for.
pub const SESSION_TTL: Duration = Duration::from_secs(600);

/// A handshake must be over within this time, on both sides.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Live tickets one server remembers; past this the oldest go first.
const MAX_SESSIONS: usize = 4096;

/// The length of the tickets this node issues.
const TICKET_LEN: usize = 32;

type HmacSha256 = Hmac<Sha256>;

/// Reads the cluster key from `file`, else from [`CLUSTER_KEY_ENV`]; says at start-up
/// which it is, and warns when there is none: the mesh is then open to anyone on the
/// link.
pub fn load_cluster_key(file: Option<&Path>) -> anyhow::Result<Option<ClusterKey>> {
    let key = match file {
        Some(path) => Some(ClusterKey::read_file(path)?),
        None => match std::env::var(CLUSTER_KEY_ENV) {
            Ok(hex) if !hex.trim().is_empty() => {
                Some(ClusterKey::from_hex(&hex).with_context(|| format!("reading the cluster key from {CLUSTER_KEY_ENV}"))?)
            }
            _ => None,
        },
    };
    match &key {
        Some(key) => tracing::info!(
            fingerprint = %key.fingerprint(),
            "private cluster: only nodes holding its cluster key can join"
        ),
        None => tracing::warn!(
            "no cluster key (--cluster-key-file or {CLUSTER_KEY_ENV}): the mesh is open to anyone on the link, \
             who can join the cluster and read or inject its traffic; create a key with `hearth key new`"
        ),
    }
    Ok(key)
}

/// `hearth key new`: writes a fresh cluster key to `out` (mode 0600, refusing to
/// replace a file unless `force`), or prints it when there is no `out`.
pub fn new_key(out: Option<&Path>, force: bool) -> anyhow::Result<()> {
    let key = ClusterKey::generate();
    match out {
        Some(path) => {
            key.write_new(path, force)?;
            eprintln!(
                "wrote a new cluster key to {} (fingerprint {}); copy it to every node of the cluster \
                 and start each with --cluster-key-file",
                path.display(),
                key.fingerprint()
            );
        }
        None => println!("{}", key.to_hex()),
    }
    Ok(())
}

/// What this node proves itself with: the MAC key derived from the cluster key, and
/// its node id. `Debug` does not show the key.
#[derive(Clone)]
pub struct Credentials {
    mac_key: [u8; 32],
    node_id: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("node_id", &self.node_id).finish_non_exhaustive()
    }
}

impl Credentials {
    pub fn new(key: &ClusterKey, node_id: impl Into<String>) -> Self {
        Self { mac_key: key.derive(AUTH_LABEL), node_id: node_id.into() }
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    fn hello(&self) -> Hello {
        let mut nonce = [0; NONCE_LEN];
        rand::rng().fill(&mut nonce);
        Hello { node_id: self.node_id.clone(), nonce }
    }

    fn hmac(&self, role: Role, client: &Hello, server: &Hello) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.mac_key).expect("HMAC takes keys of any length");
        mac.update(&transcript(role, client, server));
        mac
    }

    /// This node's proof, as `role`, for the exchange of these two hellos.
    fn prove(&self, role: Role, client: &Hello, server: &Hello) -> Proof {
        let mac: [u8; MAC_LEN] = self.hmac(role, client, server).finalize().into_bytes().into();
        Proof { mac }
    }

    /// Whether `proof` is the peer's, as `role`, for this exchange; in constant time.
    fn verify(&self, role: Role, client: &Hello, server: &Hello, proof: &Proof) -> bool {
        self.hmac(role, client, server).verify_slice(&proof.mac).is_ok()
    }
}

/// Why a handshake failed, as the client sees it.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("the node at {addr} does not hold the cluster key: its proof is wrong")]
    PeerLacksKey { addr: SocketAddr },
    #[error("the node at {addr} refused the handshake: {status}")]
    Refused { addr: SocketAddr, status: Status },
    #[error("the node at {addr} broke the handshake protocol: {reason}")]
    Protocol { addr: SocketAddr, reason: String },
    #[error("the handshake with {addr} took longer than {HANDSHAKE_TIMEOUT:?}")]
    TimedOut { addr: SocketAddr },
    #[error("the node at {addr} is not {expected}: {why}")]
    NotThePeer { addr: SocketAddr, expected: String, why: NotThePeer },
    #[error("no answer from {addr} within {timeout:?}")]
    NoAnswer { addr: SocketAddr, timeout: Duration },
    #[error("the probe of {addr} failed: {status}")]
    ProbeFailed { addr: SocketAddr, status: Status },
    #[error("the node at {addr} got {got} of the {sent} bytes probed with")]
    ProbeCut { addr: SocketAddr, got: u64, sent: u64 },
}

/// The client's side of the handshake over `channel`: returns the session the server
/// granted. Fails if the server's proof is wrong (it lacks the key), or the server
/// refuses ours.
pub async fn handshake(channel: Channel, addr: SocketAddr, credentials: &Credentials) -> Result<Session, AuthError> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, client_handshake(channel, addr, credentials))
        .await
        .unwrap_or(Err(AuthError::TimedOut { addr }))
}

async fn client_handshake(channel: Channel, addr: SocketAddr, credentials: &Credentials) -> Result<Session, AuthError> {
    let refused = |status| AuthError::Refused { addr, status };
    let protocol = |reason: String| AuthError::Protocol { addr, reason };
    let mut client = pb::auth_client::AuthClient::new(channel).with_handshake_limits();
    let (outbound, rx) = mpsc::channel(2);
    let hello = credentials.hello();
    let _ = outbound.send(HandshakeStep::Hello(hello.clone()).into_wire()).await;
    let mut replies = client.handshake(ReceiverStream::new(rx)).await.map_err(refused)?.into_inner();
    let mut next = async || -> Result<HandshakeStep, AuthError> {
        match replies.message().await.map_err(refused)? {
            Some(message) => HandshakeStep::from_wire(message).map_err(|e| protocol(e.to_string())),
            None => Err(protocol("the server ended the handshake early".into())),
        }
    };
    let HandshakeStep::Hello(server) = next().await? else {
        return Err(protocol("expected the server's hello".into()));
    };
    let HandshakeStep::Proof(proof) = next().await? else {
        return Err(protocol("expected the server's proof".into()));
    };
    if !credentials.verify(Role::Server, &hello, &server, &proof) {
        tracing::warn!(peer = %addr, node = %server.node_id, "refusing a data plane peer without the cluster key");
        return Err(AuthError::PeerLacksKey { addr });
    }
    let _ = outbound.send(HandshakeStep::Proof(credentials.prove(Role::Client, &hello, &server)).into_wire()).await;
    let HandshakeStep::Session(session) = next().await? else {
        return Err(protocol("expected a session".into()));
    };
    Ok(session)
}

/// The tickets a server issued and when each expires. Kept hashed, so looking one up
/// reveals nothing about the others through timing.
#[derive(Clone)]
pub struct Sessions {
    live: Arc<Mutex<HashMap<[u8; 32], Instant>>>,
    ttl: Duration,
}

impl Sessions {
    pub fn new(ttl: Duration) -> Self {
        Self { live: Arc::default(), ttl }
    }

    /// A new ticket, good for the TTL.
    pub fn issue(&self) -> Session {
        let mut ticket = [0; TICKET_LEN];
        rand::rng().fill(&mut ticket);
        let now = Instant::now();
        let mut live = self.live.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        live.retain(|_, expires| *expires > now);
        if live.len() >= MAX_SESSIONS {
            if let Some(oldest) = live.iter().min_by_key(|(_, expires)| **expires).map(|(hash, _)| *hash) {
                live.remove(&oldest);
            }
        }
        live.insert(Sha256::digest(ticket).into(), now + self.ttl);
        Session { ticket: Bytes::copy_from_slice(&ticket), ttl_seconds: u32::try_from(self.ttl.as_secs()).unwrap_or(u32::MAX) }
    }

    /// Whether `ticket` is one this server issued and it has not expired.
    pub fn check(&self, ticket: &[u8]) -> bool {
        let hash: [u8; 32] = Sha256::digest(ticket).into();
        let mut live = self.live.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        match live.get(&hash) {
            Some(expires) if *expires > Instant::now() => true,
            Some(_) => {
                live.remove(&hash);
                false
            }
            None => false,
        }
    }
}

/// The server's side of `Auth.Handshake`.
pub struct AuthService {
    credentials: Arc<Credentials>,
    sessions: Sessions,
}

impl AuthService {
    pub fn new(credentials: Arc<Credentials>, sessions: Sessions) -> Self {
        Self { credentials, sessions }
    }
}

type HandshakeStream = Pin<Box<dyn Stream<Item = Result<pb::HandshakeMessage, Status>> + Send>>;

#[tonic::async_trait]
impl pb::auth_server::Auth for AuthService {
    type HandshakeStream = HandshakeStream;

    async fn handshake(
        &self,
        request: Request<Streaming<pb::HandshakeMessage>>,
    ) -> Result<Response<Self::HandshakeStream>, Status> {
        let peer = request.remote_addr();
        let mut inbound = request.into_inner();
        let (replies, stream) = mpsc::channel(4);
        let (credentials, sessions) = (self.credentials.clone(), self.sessions.clone());
        tokio::spawn(async move {
            let outcome =
                tokio::time::timeout(HANDSHAKE_TIMEOUT, server_handshake(&credentials, &sessions, &mut inbound, &replies))
                    .await
                    .unwrap_or_else(|_| Err(Status::deadline_exceeded("the handshake took too long")));
            if let Err(status) = outcome {
                let peer = peer.map_or_else(|| "an unknown address".to_string(), |addr| addr.to_string());
                tracing::warn!(%peer, "refused a data plane peer: {}", status.message());
                let _ = replies.send(Err(status)).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(stream))))
    }
}

async fn server_handshake(
    credentials: &Credentials,
    sessions: &Sessions,
    inbound: &mut Streaming<pb::HandshakeMessage>,
    replies: &mpsc::Sender<Result<pb::HandshakeMessage, Status>>,
) -> Result<(), Status> {
    let mut next = async || -> Result<HandshakeStep, Status> {
        match inbound.message().await? {
            Some(message) => HandshakeStep::from_wire(message).map_err(|e| e.to_status()),
            None => Err(Status::cancelled("the client ended the handshake early")),
        }
    };
    let send = async |step: HandshakeStep| {
        replies.send(Ok(step.into_wire())).await.map_err(|_| Status::cancelled("the client went away"))
    };
    let HandshakeStep::Hello(client) = next().await? else {
        return Err(Status::invalid_argument("the handshake opens with a hello"));
    };
    let hello = credentials.hello();
    send(HandshakeStep::Hello(hello.clone())).await?;
    send(HandshakeStep::Proof(credentials.prove(Role::Server, &client, &hello))).await?;
    let HandshakeStep::Proof(proof) = next().await? else {
        return Err(Status::invalid_argument("expected the client's proof"));
    };
    if !credentials.verify(Role::Client, &client, &hello, &proof) {
        return Err(Status::unauthenticated(format!(
            "node {} does not hold the cluster key: its proof is wrong",
            client.node_id
        )));
    }
    send(HandshakeStep::Session(sessions.issue())).await
}

/// The interceptor in front of `Pipeline`: with sessions (a cluster key), a call
/// without a live ticket is refused with `UNAUTHENTICATED` before any of its
/// messages is decoded; without, every call passes.
#[derive(Clone)]
pub struct SessionCheck {
    sessions: Option<Sessions>,
}

impl SessionCheck {
    pub fn new(sessions: Option<Sessions>) -> Self {
        Self { sessions }
    }
}

impl tonic::service::Interceptor for SessionCheck {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(sessions) = &self.sessions else { return Ok(request) };
        let ticket = request.metadata().get_bin(SESSION_METADATA_KEY).and_then(|value| value.to_bytes().ok());
        let refusal = match ticket {
            Some(ticket) if sessions.check(&ticket) => return Ok(request),
            Some(_) => "unknown or expired session ticket; shake hands again",
            None => "no session ticket; call Auth.Handshake first",
        };
        let peer = request.remote_addr().map_or_else(|| "an unknown address".to_string(), |addr| addr.to_string());
        tracing::warn!(%peer, "refused a data plane call: {refusal}");
        Err(Status::unauthenticated(refusal))
    }
}

/// What a data plane server needs: the `Auth` service (with a key) and the
/// interceptor for `Pipeline`.
pub fn server(credentials: Option<Arc<Credentials>>) -> (Option<pb::auth_server::AuthServer<AuthService>>, SessionCheck) {
    match credentials {
        Some(credentials) => {
            let sessions = Sessions::new(SESSION_TTL);
            let auth = pb::auth_server::AuthServer::new(AuthService::new(credentials, sessions.clone()))
                .with_handshake_limits();
            (Some(auth), SessionCheck::new(Some(sessions)))
        }
        None => (None, SessionCheck::new(None)),
    }
}

/// A channel to one peer's data plane that attaches a session ticket to every call,
/// shaking hands when it has none or the one it has is about to expire.
pub struct AuthedChannel {
    channel: Channel,
    addr: SocketAddr,
    /// The node id the other end must prove ([`Self::confirm_peer`]).
    peer: String,
    credentials: Option<Arc<Credentials>>,
    /// The ticket, and when to shake hands again.
    session: tokio::sync::Mutex<Option<(BinaryMetadataValue, Instant)>>,
}

impl AuthedChannel {
    /// Wraps a channel to the node `peer` at `addr`; the handshake happens at the first
    /// call, and nothing checks who answers until [`Self::confirm_peer`].
    pub fn new(
        channel: Channel,
        addr: SocketAddr,
        peer: impl Into<String>,
        credentials: Option<Arc<Credentials>>,
    ) -> Self {
        Self { channel, addr, peer: peer.into(), credentials, session: tokio::sync::Mutex::new(None) }
    }

    /// Connects to the data plane of the node `peer` at `addr`, shakes hands (with
    /// credentials) and checks that the other end is `peer`.
    pub async fn connect(
        addr: SocketAddr,
        peer: impl Into<String>,
        credentials: Option<Arc<Credentials>>,
    ) -> anyhow::Result<Self> {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .tcp_nodelay(true)
            .connect_timeout(HANDSHAKE_TIMEOUT)
            .connect()
            .await
            .with_context(|| format!("cannot reach the node at {addr}"))?;
        let authed = Self::new(channel, addr, peer, credentials);
        authed.ticket().await?;
        authed.confirm_peer().await?;
        Ok(authed)
    }

    /// The address it connects to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The node this channel is for.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Checks that the other end is the peer: it must sign a fresh nonce with the key of
    /// the peer's node id. Anyone else (a machine that took over the peer's old address,
    /// this node's own loopback) is refused, and warned about once.
    pub async fn confirm_peer(&self) -> Result<(), AuthError> {
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.probe(&Limits::default(), Bytes::new(), true)).await {
            Ok(outcome) => outcome.map(drop),
            Err(_) => Err(AuthError::NoAnswer { addr: self.addr, timeout: HANDSHAKE_TIMEOUT }),
        }
    }

    /// One `Probe` carrying `payload`; with `prove`, the other end must also prove it is
    /// the peer, as in [`Self::confirm_peer`]. Returns the call's round trip (checking the
    /// proof, after it, is not part of the path's cost).
    pub async fn probe(&self, limits: &Limits, payload: Bytes, prove: bool) -> Result<Duration, AuthError> {
        let addr = self.addr;
        let nonce = prove.then(peer_identity::nonce);
        let sent = payload.len() as u64;
        let wire_nonce = nonce.map_or_else(Bytes::new, |nonce| Bytes::copy_from_slice(&nonce));
        let request = self.request(pb::ProbeRequest { payload, nonce: wire_nonce }).await?;
        let mut client = pb::pipeline_client::PipelineClient::new(self.channel()).with_limits(limits);
        let started = Instant::now();
        let reply = match client.probe(request).await {
            Ok(reply) => reply.into_inner(),
            Err(status) => {
                self.check_status(&status).await;
                return Err(AuthError::ProbeFailed { addr, status });
            }
        };
        let round_trip = started.elapsed();
        let answer =
            ProbeAnswer::from_wire(reply).map_err(|error| AuthError::Protocol { addr, reason: error.to_string() })?;
        if answer.received_bytes != sent {
            return Err(AuthError::ProbeCut { addr, got: answer.received_bytes, sent });
        }
        let Some(nonce) = nonce else { return Ok(round_trip) };
        match peer_identity::check(&self.peer, &nonce, answer.proof.as_ref()) {
            Ok(()) => Ok(round_trip),
            Err(why) => {
                peer_identity::warn_once(addr, &self.peer, &why);
                Err(AuthError::NotThePeer { addr, expected: self.peer.clone(), why })
            }
        }
    }

    /// The channel, for building clients; send requests built by [`Self::request`].
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// A request carrying a live session ticket (none without credentials).
    pub async fn request<T>(&self, message: T) -> Result<Request<T>, AuthError> {
        let mut request = Request::new(message);
        if let Some(ticket) = self.ticket().await? {
            request.metadata_mut().insert_bin(SESSION_METADATA_KEY, ticket);
        }
        Ok(request)
    }

    /// Forgets the ticket, e.g. after the server refused it (it restarted, or the ticket
    /// expired): the next call shakes hands again.
    pub async fn forget_session(&self) {
        *self.session.lock().await = None;
    }

    /// Forgets the ticket when `status` says the server refused it.
    pub async fn check_status(&self, status: &Status) {
        if status.code() == tonic::Code::Unauthenticated {
            self.forget_session().await;
        }
    }

    async fn ticket(&self) -> Result<Option<BinaryMetadataValue>, AuthError> {
        let Some(credentials) = &self.credentials else { return Ok(None) };
        let mut session = self.session.lock().await;
        if let Some((ticket, renew_at)) = &*session {
            if Instant::now() < *renew_at {
                return Ok(Some(ticket.clone()));
            }
        }
        let granted = handshake(self.channel.clone(), self.addr, credentials).await?;
        // Renew halfway through the ticket's life, well before the server refuses it.
        let renew_at = Instant::now() + Duration::from_secs(u64::from(granted.ttl_seconds)) / 2;
        let ticket = MetadataValue::from_bytes(&granted.ticket);
        *session = Some((ticket.clone(), renew_at));
        Ok(Some(ticket))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor as _;

    fn credentials(key: &ClusterKey, id: &str) -> Credentials {
        Credentials::new(key, id)
    }

    /// Runs the exchange in memory, as the two sides would over the wire.
    fn exchange(client: &Credentials, server: &Credentials) -> (bool, bool) {
        let (c, s) = (client.hello(), server.hello());
        let server_proof = server.prove(Role::Server, &c, &s);
        let client_accepts = client.verify(Role::Server, &c, &s, &server_proof);
        let client_proof = client.prove(Role::Client, &c, &s);
        let server_accepts = server.verify(Role::Client, &c, &s, &client_proof);
        (client_accepts, server_accepts)
    }

    #[test]
    fn same_key_proves_both_ways_other_keys_fail_both_ways() {
        let key = ClusterKey::generate();
        assert_eq!(exchange(&credentials(&key, "a"), &credentials(&key, "b")), (true, true));
        let other = ClusterKey::generate();
        assert_eq!(exchange(&credentials(&key, "a"), &credentials(&other, "b")), (false, false));
    }

    #[test]
    fn the_mac_key_is_derived() {
        let key = ClusterKey::from_bytes([5; 32]);
        let creds = credentials(&key, "a");
        assert_ne!(creds.mac_key, [5; 32]);
        assert_eq!(creds.mac_key, key.derive(b"hearth-auth-v1"));
        assert_ne!(creds.mac_key, key.derive(hearth_mesh::cluster_key::PNET_LABEL));
    }

    #[test]
    fn replayed_reflected_and_garbled_proofs_fail() {
        let key = ClusterKey::generate();
        let (alice, bob) = (credentials(&key, "a"), credentials(&key, "b"));
        let (c1, s1) = (alice.hello(), bob.hello());
        let proof = alice.prove(Role::Client, &c1, &s1);
        assert!(bob.verify(Role::Client, &c1, &s1, &proof));
        // Replayed into a new exchange: the server's nonce is fresh.
        let s2 = bob.hello();
        assert_ne!(s1.nonce, s2.nonce);
        assert!(!bob.verify(Role::Client, &c1, &s2, &proof));
        // Reflected: the server's own proof sent back as the client's.
        let server_proof = bob.prove(Role::Server, &c1, &s1);
        assert!(!bob.verify(Role::Client, &c1, &s1, &server_proof));
        // Garbled: any flipped bit.
        for byte in 0..MAC_LEN {
            let mut garbled = proof;
            garbled.mac[byte] ^= 0x01;
            assert!(!bob.verify(Role::Client, &c1, &s1, &garbled));
        }
        assert!(!bob.verify(Role::Client, &c1, &s1, &Proof { mac: [0; MAC_LEN] }));
    }

    fn call_with(ticket: Option<&[u8]>) -> Request<()> {
        let mut request = Request::new(());
        if let Some(ticket) = ticket {
            request.metadata_mut().insert_bin(SESSION_METADATA_KEY, MetadataValue::from_bytes(ticket));
        }
        request
    }

    #[test]
    fn the_interceptor_wants_a_live_ticket() {
        let sessions = Sessions::new(Duration::from_secs(60));
        let mut check = SessionCheck::new(Some(sessions.clone()));
        let session = sessions.issue();
        assert_eq!(session.ticket.len(), TICKET_LEN);
        assert!(check.call(call_with(Some(&session.ticket))).is_ok());
        for refused in [None, Some(&[0u8; 32][..]), Some(&session.ticket[..16])] {
            let status = check.call(call_with(refused)).unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unauthenticated);
        }
        // Without a key, every call passes.
        assert!(SessionCheck::new(None).call(call_with(None)).is_ok());
    }

    #[test]
    fn expired_tickets_are_refused_and_forgotten() {
        let sessions = Sessions::new(Duration::from_millis(30));
        let mut check = SessionCheck::new(Some(sessions.clone()));
        let session = sessions.issue();
        assert!(check.call(call_with(Some(&session.ticket))).is_ok());
        std::thread::sleep(Duration::from_millis(50));
        let status = check.call(call_with(Some(&session.ticket))).unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
        assert!(sessions.live.lock().unwrap().is_empty());
    }

    #[test]
    fn sessions_are_bounded() {
        let sessions = Sessions::new(Duration::from_secs(60));
        let first = sessions.issue();
        for _ in 0..MAX_SESSIONS {
            sessions.issue();
        }
        assert_eq!(sessions.live.lock().unwrap().len(), MAX_SESSIONS);
        assert!(!sessions.check(&first.ticket), "the oldest ticket made room");
    }

    #[test]
    fn debug_hides_the_mac_key() {
        let creds = credentials(&ClusterKey::from_bytes([0xcd; 32]), "node");
        let shown = format!("{creds:?}");
        assert!(shown.contains("node") && !shown.contains("205"));
    }
}

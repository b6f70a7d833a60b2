//! Prompt passes computed ahead of the user: live steering's latency.
//!
//! A steered reply's first token costs one exact prompt pass (130–200 ms for a 40-token
//! prompt on 2 cores), and a slider move changes the edits at every position, so nothing of
//! the last pass can be reused. What can be done is to compute the next values' passes
//! before they are asked for: each steer job brings the stacks the controls are likely to
//! take next (the moved slider's neighbouring steps, nearest first), and while no job waits
//! the worker computes their prompt passes, one at a time, stopping between blocks as soon as
//! a job arrives. A reply whose passes are kept starts at its first token at once, and is the
//! reply that would have computed them (`generate_with` takes a pass only for the same model,
//! prompt and hooks: the store is keyed on the prompt's ids and the steering stack, and
//! emptied whenever a job may change the model or the directions).

use std::collections::{HashMap, VecDeque};

use refusal_lens_engine::analysis::steering::Steering;
use refusal_lens_engine::run::generate::{generate_with, PassKind, PromptPass, PromptPasses};
use refusal_lens_engine::Error;

use super::protocol::GenerateRequest;
use super::replies::generate_config;
use super::state::State;

/// Bytes of passes kept (a 40-token prompt's pass on the default model is about 2 MB).
const STORE_BYTES: usize = 256 << 20;

/// What a pass was made for besides the model and directions: the prompt's ids and the
/// stack (as JSON: the stack holds floats, which do not hash).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    ids: Vec<u32>,
    steering: String,
}

impl Key {
    fn new(ids: &[u32], steering: &Steering) -> Key {
        Key {
            ids: ids.to_vec(),
            steering: serde_json::to_string(steering).expect("a stack serialises"),
        }
    }
}

struct Entry {
    passes: HashMap<PassKind, PromptPass>,
    last_used: u64,
}

/// Kept prompt passes, least recently used dropped first once over [`STORE_BYTES`].
#[derive(Default)]
pub(super) struct Ahead {
    entries: HashMap<Key, Entry>,
    bytes: usize,
    clock: u64,
    /// The request the queued stacks belong to, and the stacks still to compute.
    request: Option<GenerateRequest>,
    queue: VecDeque<Steering>,
}

/// The store as one reply sees it: the passes of one key.
pub(super) struct KeptPasses<'a> {
    ahead: &'a mut Ahead,
    key: Key,
}

impl PromptPasses for KeptPasses<'_> {
    fn get(&mut self, kind: PassKind) -> Option<PromptPass> {
        self.ahead.clock += 1;
        let clock = self.ahead.clock;
        let entry = self.ahead.entries.get_mut(&self.key)?;
        entry.last_used = clock;
        entry.passes.get(&kind).cloned()
    }

    fn put(&mut self, kind: PassKind, pass: &PromptPass) {
        self.ahead.insert(self.key.clone(), kind, pass.clone());
    }
}

impl Ahead {
    /// The passes of a reply to `ids` under `steering`.
    pub fn passes_for(&mut self, ids: &[u32], steering: &Steering) -> KeptPasses<'_> {
        KeptPasses {
            key: Key::new(ids, steering),
            ahead: self,
        }
    }

    /// Whether the `kind` pass of a reply to `ids` under `steering` is kept.
    pub fn has(&self, ids: &[u32], steering: &Steering, kind: PassKind) -> bool {
        self.entries
            .get(&Key::new(ids, steering))
            .is_some_and(|e| e.passes.contains_key(&kind))
    }

    /// Forgets every pass and plan (the model or the directions may have changed).
    pub fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
        self.request = None;
        self.queue.clear();
    }

    /// From now on, computes the passes of `request` under each of `stacks` in turn, while
    /// the worker is idle (replacing the previous plan).
    pub fn plan(&mut self, request: &GenerateRequest, stacks: Vec<Steering>) {
        self.request = Some(request.clone());
        self.queue = stacks.into();
    }

    pub fn has_work(&self) -> bool {
        self.request.is_some() && !self.queue.is_empty()
    }

    /// Computes the next planned stack's prompt passes, stopping between blocks once
    /// `interrupted` says a job is waiting (the stack then stays first in line). A stack whose
    /// passes are kept already costs nothing.
    pub fn step(&mut self, state: &State, interrupted: &dyn Fn() -> bool) {
        // Room is left for the passes of the replies the user asks for.
        if self.bytes >= STORE_BYTES / 4 * 3 {
            self.queue.clear();
        }
        let (Some(request), Some(steering)) = (self.request.clone(), self.queue.pop_front()) else {
            return;
        };
        let Ok(m) = state.active() else {
            return self.clear();
        };
        let mut request = request;
        request.steering = steering;
        let computed = (|| -> refusal_lens_engine::Result<()> {
            let prompt = m.chat_prompt(request.system.as_deref(), &request.prompt)?;
            let mut cfg = generate_config(m, state.lens.directions.as_deref(), &request, &prompt)?;
            // The first token, and after `[respond]` the second: every prompt pass a reply
            // under these settings makes.
            let respond_pass = cfg.refusal_gate.is_some() && m.respond_blocks.is_some();
            cfg.max_new_tokens = if respond_pass { 2 } else { 1 };
            let g = generate_with(
                m,
                &prompt.ids,
                &cfg,
                &mut self.passes_for(&prompt.ids, &request.steering),
                interrupted,
                &mut |_| {},
            )?;
            if g.stop == refusal_lens_engine::run::generate::StopReason::Cancelled {
                return Err(Error::Cancelled);
            }
            Ok(())
        })();
        // A stack this model cannot run (no directions) leaves nothing to keep; one stopped
        // by a job stays first in line.
        if let Err(Error::Cancelled) = computed {
            self.queue.push_front(request.steering);
        }
    }

    fn insert(&mut self, key: Key, kind: PassKind, pass: PromptPass) {
        self.clock += 1;
        let bytes = pass.bytes();
        let entry = self.entries.entry(key).or_insert_with(|| Entry {
            passes: HashMap::new(),
            last_used: 0,
        });
        entry.last_used = self.clock;
        if let Some(old) = entry.passes.insert(kind, pass) {
            self.bytes -= old.bytes();
        }
        self.bytes += bytes;
        while self.bytes > STORE_BYTES && self.entries.len() > 1 {
            let oldest = self
                .entries
                .iter()
                .min_by_key(|(_, e)| e.last_used)
                .map(|(k, _)| k.clone())
                .expect("entries are not empty");
            let gone = self.entries.remove(&oldest).expect("the oldest entry");
            self.bytes -= gone.passes.values().map(PromptPass::bytes).sum::<usize>();
        }
    }
}

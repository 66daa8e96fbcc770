"""Kiln's registry vocabulary: every ``kiln.*`` tag, every alias and every audit event name, defined once.

Aliases tell a registered model's state, tags tell each version's story, audit events tell the order in
which things happened (``<KILN_HOME>/audit.jsonl``). Code reads and writes them only through these
names, so that a tag's spelling lives in one place and ``grep`` finds every reader of a tag.

Imports nothing from Kiln: every layer may use it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

# ── aliases: the state of a registered model ─────────────────────────────────────────────────────────
CHAMPION = "champion"  # serves production traffic
CHALLENGER = "challenger"  # passed its gate; the next version to roll out or promote
PREVIOUS = "previous"  # the champion before the last promotion: the rollback target
DECISIONS = frozenset({CHAMPION, CHALLENGER, PREVIOUS})  # moved only by promotion's decisions, never by point()
BENCH = "kiln-bench"  # the serving benchmark's own alias: it moves this one, never @champion

# ── model-version tags: where a version comes from (written when it is registered) ──────────────────
CANDIDATE_KEY = "kiln.candidate_key"  # the optimize work that built it; re-runs find the version by it
RECIPE = "kiln.recipe"  # recipe name, or "source" for a registered Hugging Face folder
PRECISION = "kiln.precision"
TASK = "kiln.task"  # sequence-classification | causal-lm
PARENT_VERSION = "kiln.parent_version"  # the source version an engine was built from
DATASET = "kiln.dataset"  # the DatasetSpec (JSON) the version is judged on
METRICS = "kiln.metrics"  # JSON: the candidate's measured metrics
STAGES = "kiln.stages"  # JSON: each stage with its params and metrics
SHA256 = "kiln.sha256"  # JSON: the package's file checksums (checked on every download)
SOURCE_SHA256 = "kiln.source_sha256"  # checksum of a registered folder's weights
SOURCE_DIGEST = "kiln.source_digest"  # "files-v1:<sha256>" of every file that defines a registered folder's model
PACKAGE_DIGEST = "kiln.package_digest"  # sha256 of the package's kiln.json bytes: pins the whole package
ORIGIN = "kiln.origin"  # the local folder a source version was registered from
GGUF = "kiln.gguf"  # JSON: the GGUF file a source version was imported from (name, quantization, sha256)
GIT_COMMIT = "kiln.git_commit"  # Kiln's own commit that built the engine
TRIGGERED_BY = "kiln.triggered_by"  # who or what started the work (four-eyes review reads it)
RUN_ID = "kiln.run_id"  # the MLflow run that built or registered it
DATASET_DIGEST = "kiln.dataset_digest"  # optimize: digest of the splits the gate measured
BACKEND = "kiln.backend"  # optimize: engine backend (onnxruntime | tensorrt)
ENGINE = "kiln.engine"  # optimize: JSON engine options and library versions
BASELINE = "kiln.baseline"  # optimize: what the gate compared against (source or champion)
DEMO_FAULTS = "kiln.demo_faults"  # the demo's sabotaged copy: the faults its server injects
RECIPE_YAML = "kiln.recipe_yaml"  # optimize --search: the generated recipe as YAML (rebuild it with --recipe-file)
# ── run tags: a compression search's trials (nested runs under the optimize run) ─────────────────────
SEARCH_STUDY = "kiln.search.study"  # the Optuna study the trial belongs to (storage + name resume it)
SEARCH_TRIAL = "kiln.search.trial"  # the trial's number in that study
SEARCH_STATE = "kiln.search.state"  # complete | pruned | failed

# ── model-version tags: the gate ─────────────────────────────────────────────────────────────────────
GATE = "kiln.gate"  # GATE_PASSED | GATE_FAILED
GATE_REASONS = "kiln.gate_reasons"  # JSON list: one reason per gate clause
GATE_PASSED, GATE_FAILED = "passed", "failed"

# ── model-version tags: the approval (``kiln approve``, the promote flow, the MLflow UI) ────────────
APPROVAL = "kiln.approval"  # one of the approval values below
APPROVER = "kiln.approver"
APPROVAL_REASON = "kiln.approval_reason"
APPROVAL_AT = "kiln.approval_at"
PROMOTE_FLOW_RUN = "kiln.promote_flow_run"  # the paused promote flow run that waits on this version
# Approval values; a decision is also logged as the audit event of the same name.
APPROVED, REJECTED, NOT_APPROVED = "approved", "rejected", "not_approved"
REFUSED = "refused"  # an approval by someone not allowed, reset by the promote flow
PENDING = "pending"  # signed approvals are in, but not yet enough (four-eyes without an authenticated trigger)
# The summary above is for people; what counts is the signed decisions. One slot per signer (decision_tag),
# each a JSON {statement, signature}; written before kiln.approval, which is written last.
DECISION_PREFIX = "kiln.decision."

# ── model-version tags: nominations (each time a version becomes @challenger) and signed requests ───
NOMINATION = "kiln.nomination"  # id of the version's open nomination; a decision names the one it answers
NOMINATED_AT = "kiln.nominated_at"
REQUEST = "kiln.request"  # JSON {statement, signature}: the signed request that started the work (four-eyes)
REQUEST_ID = "kiln.request_id"  # that request's id: one request authenticates one version

# ── model-version tags: promotion and rollback (the latest of each per version) ─────────────────────
PROMOTED_AT, PROMOTED_BY, PROMOTION_REASON = "kiln.promoted_at", "kiln.promoted_by", "kiln.promotion_reason"
DEMOTED_AT, DEMOTED_BY, DEMOTION_REASON = "kiln.demoted_at", "kiln.demoted_by", "kiln.demotion_reason"
ROLLED_BACK_AT, ROLLED_BACK_BY, ROLLBACK_REASON = "kiln.rolled_back_at", "kiln.rolled_back_by", "kiln.rollback_reason"
RESTORED_AT = "kiln.restored_at"  # on the version a rollback made champion again (by/reason as above)

# ── model-version tags: retraining from a pushed commit ─────────────────────────────────────────────
GIT_SHA = "kiln.git_sha"
GIT_REPO = "kiln.git_repo"
GIT_BRANCH = "kiln.git_branch"
CONFIG_PATH = "kiln.config_path"
CONFIG_DIGEST = "kiln.config_digest"
DATA_PATH = "kiln.data_path"
DATA_DIGEST = "kiln.data_digest"
BASE_MODEL = "kiln.base_model"  # the reference fine-tuned from (NAME@ALIAS or NAME/VERSION)
BASE_VERSION = "kiln.base_version"  # the NAME/VERSION it resolved to
TRAIN_METRICS = "kiln.train_metrics"
# ── model-version tags: labelled feedback a retrain added to its training split ────────────────────
FEEDBACK_ROWS = "kiln.feedback_rows"  # how many validated feedback rows were added to the train split
FEEDBACK_DIGEST = "kiln.feedback_digest"  # digest of those rows (also part of a retrained version's identity)
FEEDBACK_STORE = "kiln.feedback_store"  # where they were read (a folder, or s3://bucket/prefix)
FEEDBACK_DAYS = "kiln.feedback_days"  # the window they were read from: the last N days

# ── model-version tags: a canary rollout's summary and command channel, on the challenger ──────────
ROLLOUT_PREFIX = "kiln.rollout."  # every rollout tag starts with it
ROLLOUT_STATUS = ROLLOUT_PREFIX + "status"  # running | paused | promoted | rolled_back | aborted
ROLLOUT_STEP = ROLLOUT_PREFIX + "step"  # "2/5"
ROLLOUT_WEIGHT = ROLLOUT_PREFIX + "weight"  # percent of live traffic on the challenger
ROLLOUT_MESSAGE = ROLLOUT_PREFIX + "message"
ROLLOUT_REASON = ROLLOUT_PREFIX + "reason"  # why it was rolled back or aborted
ROLLOUT_ENDED_AT = ROLLOUT_PREFIX + "ended_at"
ROLLOUT_COMMAND = ROLLOUT_PREFIX + "command"  # a signed pause | resume | promote | abort, consumed by the driver
ROLLOUT_ID = ROLLOUT_PREFIX + "id"  # the running rollout's id: a command names the rollout it is for
ROLLOUT_NOTE = ROLLOUT_PREFIX + "note"  # the last command the driver ignored, and why

# ── Kubernetes annotations on a routed object (HTTPRoute, InferenceService): a split's lease ────────
SPLIT_EXPIRES_AT = "kiln.dev/split-expires-at"  # ISO-8601 UTC; past it, the next kiln command reverts the split

# ── registered-model tags: the model's lease (a registered model named LEASE_MODEL_PREFIX + NAME) ──
LEASE_MODEL_PREFIX = "kiln-lease."  # the registered model that is NAME's lease while it exists
LEASE_OWNER = "kiln.lease_owner"  # host:pid:nonce of the holding process
LEASE_PURPOSE = "kiln.lease_purpose"  # one of LEASE_PURPOSES
LEASE_VERSION = "kiln.lease_version"  # the version the holder acts on ("" when none)
LEASE_EXPIRES = "kiln.lease_expires"  # epoch seconds; renewed while held, an expired lease may be taken over
LEASE_RENEWED_AT = "kiln.lease_renewed_at"  # epoch seconds of the last renewal
LEASE_PURPOSES = ("publish", "promote", "rollout", "rollback")

# ── registered-model tags: the monitor's action on a served model (one at a time) ────────────────────
MONITOR_ACTION = "kiln.monitor.action"  # JSON {action, id, started_at, timeout_s, detail}: the action in flight
MONITOR_LAST_ACTION = "kiln.monitor.last_action"  # JSON: the last action finished, with its outcome

# ── run tags: MLflow runs of optimize and of rollouts ────────────────────────────────────────────────
RUN_MODEL = "kiln.model"  # the model reference the run works on (set before any version exists)
RUN_KIND = "kiln.kind"  # "rollout" for a rollout's run, "monitor" for a monitor's day
RUN_CHALLENGER = "kiln.challenger"  # a rollout run's challenger version
RUN_CHAMPION = "kiln.champion"  # a rollout run's champion version ("" when there was none)
RUN_DAY = "kiln.day"  # a monitor run's UTC day (YYYY-MM-DD): one run per model and day, a step per evaluation
RUN_VERSION = "kiln.version"  # the version a monitor run last judged (the champion then)

# ── Prefect events the monitor emits (Prefect automations match on these names and resource ids) ────────
MONITOR_BREACH_EVENT = "kiln.monitor.breach"  # a monitor evaluation found a breach; the payload is the verdict
EVENT_RESOURCE_PREFIX = "kiln.model."  # + model name: the event's resource id (prefect.resource.id)
EVENT_VERSION_LABEL = "kiln.model_version"  # the resource label holding the judged version

# ── audit events (the ``event`` of a line in audit.jsonl, shown by ``kiln history``) ────────────────
EVENT_REGISTERED = "registered"
EVENT_GATE = "gate"
EVENT_APPROVAL_REFUSED = "approval_refused"  # approvals themselves are logged as APPROVED / REJECTED / ...
EVENT_PROMOTED = "promoted"
EVENT_DEMOTED = "demoted"
EVENT_ROLLED_BACK = "rolled_back"
EVENT_RESTORED = "restored"
EVENT_CANARY_PROMOTED = "canary_promoted"
EVENT_CANARY_ROLLED_BACK = "canary_rolled_back"
EVENT_LEASE_BROKEN = "lease_broken"  # `kiln lease break`: an operator cleared a lease
EVENT_ROLLOUT_COMMAND_IGNORED = "rollout_command_ignored"  # unsigned, foreign or replayed rollout command
EVENT_MONITOR_ACTION_STARTED = "monitor_action_started"  # the monitor began acting on a breach (notify, ...)
EVENT_MONITOR_ACTION_FINISHED = "monitor_action_finished"  # ... and recorded how it ended


def rollout_command_event(command: str) -> str:
    """The audit event of a rollout command (``rollout_pause``, ``rollout_abort``, ...)."""
    return f"rollout_{command}"


def decision_tag(principal: str) -> str:
    """The tag holding ``principal``'s signed decision on a version (a hash: principals may hold characters
    that tag names may not)."""
    return DECISION_PREFIX + hashlib.sha256(principal.encode()).hexdigest()[:16]


def gate_passed(tags: Mapping[str, str]) -> bool:
    """Whether a version's tags say it passed its gate (a version without the tag did not)."""
    return tags.get(GATE) == GATE_PASSED

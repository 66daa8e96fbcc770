"""The MLflow model registry, as Kiln uses it.

    client        resolve NAME[@ALIAS|/VERSION], read aliases, fetch and verify packages, tag versions
    aliases       the only code that moves aliases (nominate, withdraw, claim_first, promote,
                  restore_previous), each under the model's lease and checking the aliases it expects
    lease         ModelLease: one actor per model (publish, promote, rollout, rollback), renewed, across machines
    lease_record  the lease as the registry records it (read, validated, broken) and PromotionError and its kin
    nominations   a fresh id each time a version becomes @challenger; decisions count only for the open one
    onboard       register a local Hugging Face folder (``kiln register``); its first version is champion
    pins          the package digest (sha256 of kiln.json, which lists every file) the registry pins per version
    pyfunc        the MLflow pyfunc wrapper around a Kiln package (pyfunc_entry: its code path); checks the pin
    storage       artifact stores: a package against its pin and every file against kiln.json, S3 checks
    audit         the audit log (``<KILN_HOME>/audit.jsonl``) and the history merged from tags

Tag, alias and audit event names come from :mod:`kiln.tasks.core.tags`.
May import ``models``, ``engines``, ``data``, ``core`` (and settings, errors); not ``evaluate``.
"""

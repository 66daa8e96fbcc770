"""The MLflow model registry, as Kiln uses it.

    client        resolve NAME[@ALIAS|/VERSION], read aliases, fetch and verify packages, tag versions
    aliases       the only code that moves aliases (nominate, withdraw, claim_first, promote,
                  restore_previous), each under the model's lock and checking the aliases it expects
    lock          ModelLock (one alias mover per model, across processes and machines), PromotionConflict
    onboard       register a local Hugging Face folder (``kiln register``); its first version is champion
    pyfunc        the MLflow pyfunc wrapper around a Kiln package (pyfunc_entry: its code path)
    storage       artifact stores: checksums against the registry's tags, S3 checks
    audit         the audit log (``<KILN_HOME>/audit.jsonl``) and the history merged from tags

Tag, alias and audit event names come from :mod:`kiln.tasks.core.tags`.
May import ``models``, ``engines``, ``data``, ``core`` (and settings, errors); not ``evaluate``.
"""

"""A version's life after its gate: signed decisions on it (signatures, approvals, approvers: who may decide,
four-eyes), promotion and rollback (champion/previous), the approver's review, and retraining from a pushed
commit.

May import ``optimize``, ``registry`` and everything below them.
"""

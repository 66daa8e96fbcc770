"""Long-running parts of Kiln (serving gateway, webhook receiver, local stack) and scale-out material.

The spine (issue 2) needs none of them: flows run on Prefect's ephemeral API and MLflow's embedded
SQLite store. See README.md, "What is built and verified where".
"""

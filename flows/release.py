"""Release operations: promote a gated candidate already exported to ``artifacts/release``, or roll back.

``promote`` refuses (returns ``promoted: None``) when the release's gate failed; ``rollback`` makes an earlier
release current again (local: the ``latest`` pointer; lakeFS: reverts on ``main``).
"""

from __future__ import annotations

from prefect import flow, runtime

from tasks.commands import Commands
from tasks.stages import promote_release, rollback_release


@flow(name="anyflow-release")
def release(repo: str = ".", action: str = "promote", name: str | None = None,
            cmds: Commands = Commands()) -> dict:
    """``action="promote"`` (optional ``name``) or ``action="rollback"`` (``name`` = the release to restore)."""
    if action == "promote":
        return promote_release(repo, cmds, name, flow_run=runtime.flow_run.id)
    if action == "rollback":
        if not name:
            raise ValueError("release(action='rollback') needs name= the release to roll back to")
        return rollback_release(repo, cmds, name)
    raise ValueError(f"action: expected 'promote' or 'rollback', got {action!r}")


if __name__ == "__main__":
    print(release())

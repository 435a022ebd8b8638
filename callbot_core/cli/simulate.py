"""`callbot simulate`: an LLM plays a caller with a goal and phones a persona version; prints the call."""

from __future__ import annotations

import click

from callbot_core.cli._common import acting_user, open_checked_store, open_service


@click.command("simulate")
@click.option("--persona", "persona", required=True, metavar="KEY@V", help="The bot persona version to call.")
@click.option("--goal", required=True, help="What the simulated caller wants from the call.")
@click.option("--turns", default=3, show_default=True, type=int, help="Caller turns (1-20).")
@click.option("--personality", default="polite", show_default=True, help="How the caller behaves.")
@click.option("--opening", default=None, help="The caller's first line, word for word (default: the model's).")
@click.option("--caller-backend", default=None, help="Backend of the caller model (default: the configured one).")
@click.option("--caller-model", default=None, help="Model of the caller (default: the backend's).")
def simulate_cmd(
    persona: str,
    goal: str,
    turns: int,
    personality: str,
    opening: str | None,
    caller_backend: str | None,
    caller_model: str | None,
) -> None:
    """Run a simulated call (stored with channel "simulated") and print its transcript."""
    from callbot_core.experiments.simulated import CallerPersona, simulate_call

    caller = CallerPersona(goal=goal, personality=personality, turns=turns, opening=opening)
    caller.validate()
    store = open_checked_store()
    service = open_service(store)

    def show(turn) -> None:  # type: ignore[no-untyped-def]
        click.echo(f"caller: {turn.caller}")
        ms = "" if turn.result.total_ms is None else f"  [{turn.result.total_ms:,.0f} ms]"
        click.echo(f"bot:    {turn.bot or '(no reply)'}{ms}")

    result = simulate_call(
        service,
        persona,
        caller,
        caller_backend=caller_backend,
        caller_model=caller_model,
        actor=acting_user(store),
        on_turn=show,
    )
    click.echo(f"Conversation {result.conversation_id} (channel simulated), {len(result.turns)} turn(s)")
    if result.error:
        click.secho(result.error, fg="red")

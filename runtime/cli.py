"""`fbnet-serve-cli`: retrieval from an exported bundle without torch."""

import click


@click.command()
def main():
    """Serve retrieval queries from an exported FB-Net bundle."""
    raise click.ClickException("the serving runtime arrives with the export issue; nothing to serve yet")

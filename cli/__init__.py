"""Command-line front end of sdsurgery (typer). The library never imports this package."""

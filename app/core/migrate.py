"""Schema migrations, run through Alembic from code (`trainsvc migrate`, `trainsvc up`)."""

from importlib.resources import files

from alembic import command
from alembic.config import Config


def alembic_config(database_url: str) -> Config:
    config = Config()
    # The package `migrations` (the repository's migrations/ folder), wherever it is installed:
    # a checkout, an editable install or a wheel. Installed as files, so this is a real path.
    config.set_main_option("script_location", str(files("migrations")))
    config.attributes["database_url"] = database_url
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str) -> None:
    command.downgrade(alembic_config(database_url), revision)

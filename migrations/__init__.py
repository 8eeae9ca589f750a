"""Alembic's migrations, shipped in the wheel as a package so an install finds them too."""

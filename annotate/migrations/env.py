"""Alembic environment: runs on the engine that annotate.db passes in (no alembic.ini, no URL here)."""

from alembic import context

from annotate.models import Base

engine = context.config.attributes["engine"]
with engine.connect() as connection:
    context.configure(connection=connection, target_metadata=Base.metadata,
                      render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()

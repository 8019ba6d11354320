"""The initial schema: campaigns, images, gold pairs, annotators, pairs, judgments (annotate/models.py).

Revision ID: 0001
Revises:
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "campaigns",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("images_root", sa.Text(), nullable=False),
        sa.Column("gold_root", sa.Text(), nullable=True),
        sa.Column("rounds", sa.Integer(), nullable=False),
        sa.Column("gold_rate", sa.Float(), nullable=False),
        sa.Column("signing_key", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_campaigns")),
        sa.UniqueConstraint("name", name=op.f("uq_campaigns_name")),
    )
    op.create_table(
        "annotators",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("campaign_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("token_sha256", sa.String(64), nullable=False),
        sa.Column("seed", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["campaign_id"], ["campaigns.id"], name=op.f("fk_annotators_campaign_id_campaigns")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_annotators")),
        sa.UniqueConstraint("campaign_id", "name", name=op.f("uq_annotators_campaign_id_name")),
        sa.UniqueConstraint("token_sha256", name=op.f("uq_annotators_token_sha256")),
    )
    op.create_index(op.f("ix_annotators_campaign_id"), "annotators", ["campaign_id"])
    op.create_table(
        "images",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("campaign_id", sa.Integer(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("media_type", sa.String(40), nullable=False),
        sa.Column("in_tournament", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(["campaign_id"], ["campaigns.id"], name=op.f("fk_images_campaign_id_campaigns")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_images")),
        sa.UniqueConstraint("campaign_id", "path", "in_tournament",
                            name=op.f("uq_images_campaign_id_path_in_tournament")),
    )
    op.create_index(op.f("ix_images_campaign_id"), "images", ["campaign_id"])
    op.create_table(
        "gold_pairs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("campaign_id", sa.Integer(), nullable=False),
        sa.Column("winner_id", sa.Integer(), nullable=False),
        sa.Column("loser_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["campaign_id"], ["campaigns.id"], name=op.f("fk_gold_pairs_campaign_id_campaigns")),
        sa.ForeignKeyConstraint(["winner_id"], ["images.id"], name=op.f("fk_gold_pairs_winner_id_images")),
        sa.ForeignKeyConstraint(["loser_id"], ["images.id"], name=op.f("fk_gold_pairs_loser_id_images")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_gold_pairs")),
    )
    op.create_index(op.f("ix_gold_pairs_campaign_id"), "gold_pairs", ["campaign_id"])
    op.create_table(
        "pairs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("annotator_id", sa.Integer(), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("left_id", sa.Integer(), nullable=False),
        sa.Column("right_id", sa.Integer(), nullable=False),
        sa.Column("gold_pair_id", sa.Integer(), nullable=True),
        sa.Column("requeued_from_id", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(["annotator_id"], ["annotators.id"], name=op.f("fk_pairs_annotator_id_annotators")),
        sa.ForeignKeyConstraint(["left_id"], ["images.id"], name=op.f("fk_pairs_left_id_images")),
        sa.ForeignKeyConstraint(["right_id"], ["images.id"], name=op.f("fk_pairs_right_id_images")),
        sa.ForeignKeyConstraint(["gold_pair_id"], ["gold_pairs.id"], name=op.f("fk_pairs_gold_pair_id_gold_pairs")),
        sa.ForeignKeyConstraint(["requeued_from_id"], ["pairs.id"], name=op.f("fk_pairs_requeued_from_id_pairs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pairs")),
        sa.UniqueConstraint("annotator_id", "round", "position", name=op.f("uq_pairs_annotator_id_round_position")),
    )
    op.create_index(op.f("ix_pairs_annotator_id"), "pairs", ["annotator_id"])
    op.create_table(
        "judgments",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("pair_id", sa.Integer(), nullable=False),
        sa.Column("choice", sa.String(5), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("choice IN ('left', 'right', 'tie', 'skip')", name=op.f("ck_judgments_choice")),
        sa.ForeignKeyConstraint(["pair_id"], ["pairs.id"], name=op.f("fk_judgments_pair_id_pairs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_judgments")),
        sa.UniqueConstraint("pair_id", name=op.f("uq_judgments_pair_id")),
    )


def downgrade() -> None:
    for table in ("judgments", "pairs", "gold_pairs", "images", "annotators", "campaigns"):
        op.drop_table(table)

"""Knowledge: collections, documents, chunks, the embedding cache, which passages each turn retrieved, retrieval
evaluations; persona versions name a collection, k and a low-relevance threshold

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("persona_versions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("knowledge_collection", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("knowledge_k", sa.Integer(), nullable=False, server_default="4"))
        batch_op.add_column(sa.Column("knowledge_threshold", sa.Float(), nullable=True))

    op.create_table(
        "knowledge_collections",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("embedder", sa.String(length=100), nullable=False),
        sa.Column("dimensions", sa.Integer(), nullable=False),
        sa.Column("vector_name", sa.String(length=64), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("created_by", sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_knowledge_collections")),
        sa.UniqueConstraint("name", name=op.f("uq_knowledge_collections_name")),
        sa.UniqueConstraint("vector_name", name=op.f("uq_knowledge_collections_vector_name")),
    )
    op.create_table(
        "knowledge_documents",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("collection_id", sa.Integer(), nullable=False),
        sa.Column("source", sa.String(length=500), nullable=False),
        sa.Column("format", sa.String(length=10), nullable=False),
        sa.Column("content_hash", sa.String(length=64), nullable=False),
        sa.Column("size_bytes", sa.Integer(), nullable=False),
        sa.Column("pages", sa.Integer(), nullable=True),
        sa.Column("chunk_count", sa.Integer(), nullable=False),
        sa.Column("chunk_size", sa.Integer(), nullable=False),
        sa.Column("chunk_overlap", sa.Integer(), nullable=False),
        sa.Column("ingested_at", TS, nullable=False),
        sa.Column("ingested_by", sa.String(length=64), nullable=True),
        sa.ForeignKeyConstraint(
            ["collection_id"],
            ["knowledge_collections.id"],
            name=op.f("fk_knowledge_documents_collection_id_knowledge_collections"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_knowledge_documents")),
        sa.UniqueConstraint("collection_id", "source", name="uq_knowledge_documents_collection_source"),
    )
    op.create_table(
        "knowledge_chunks",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("document_id", sa.Integer(), nullable=False),
        sa.Column("collection_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("page", sa.Integer(), nullable=True),
        sa.Column("heading", sa.String(length=500), nullable=True),
        sa.Column("content_hash", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(
            ["collection_id"],
            ["knowledge_collections.id"],
            name=op.f("fk_knowledge_chunks_collection_id_knowledge_collections"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["document_id"],
            ["knowledge_documents.id"],
            name=op.f("fk_knowledge_chunks_document_id_knowledge_documents"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_knowledge_chunks")),
    )
    op.create_index(op.f("ix_knowledge_chunks_collection_id"), "knowledge_chunks", ["collection_id"], unique=False)
    op.create_index(
        "ix_knowledge_chunks_document_id_position", "knowledge_chunks", ["document_id", "position"], unique=False
    )
    op.create_table(
        "embedding_cache",
        sa.Column("embedder", sa.String(length=100), nullable=False),
        sa.Column("content_hash", sa.String(length=64), nullable=False),
        sa.Column("vector", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("embedder", "content_hash", name=op.f("pk_embedding_cache")),
    )
    op.create_table(
        "turn_retrievals",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("turn_metrics_id", sa.Integer(), nullable=False),
        sa.Column("chunk_id", sa.Integer(), nullable=True),
        sa.Column("collection", sa.String(length=64), nullable=False),
        sa.Column("source", sa.String(length=500), nullable=False),
        sa.Column("page", sa.Integer(), nullable=True),
        sa.Column("heading", sa.String(length=500), nullable=True),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("similarity", sa.Float(), nullable=True),
        sa.Column("low_relevance", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(
            ["chunk_id"],
            ["knowledge_chunks.id"],
            name=op.f("fk_turn_retrievals_chunk_id_knowledge_chunks"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["turn_metrics_id"],
            ["turn_metrics.id"],
            name=op.f("fk_turn_retrievals_turn_metrics_id_turn_metrics"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_turn_retrievals")),
        sa.UniqueConstraint("turn_metrics_id", "rank", name="uq_turn_retrievals_turn_rank"),
    )
    op.create_index(op.f("ix_turn_retrievals_chunk_id"), "turn_retrievals", ["chunk_id"], unique=False)
    op.create_table(
        "retrieval_evals",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("collection", sa.String(length=64), nullable=False),
        sa.Column("questions_file", sa.String(length=500), nullable=False),
        sa.Column("k", sa.Integer(), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("embedder", sa.String(length=100), nullable=False),
        sa.Column("chunk_size", sa.Integer(), nullable=True),
        sa.Column("chunk_overlap", sa.Integer(), nullable=True),
        sa.Column("questions", sa.Integer(), nullable=False),
        sa.Column("answerable", sa.Integer(), nullable=False),
        sa.Column("recall_at_k", sa.Float(), nullable=True),
        sa.Column("mrr", sa.Float(), nullable=True),
        sa.Column("unanswerable_flagged", sa.Integer(), nullable=False),
        sa.Column("unanswerable", sa.Integer(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("created_by", sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_retrieval_evals")),
    )
    op.create_index(op.f("ix_retrieval_evals_collection"), "retrieval_evals", ["collection"], unique=False)
    op.create_table(
        "retrieval_eval_results",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("retrieval_eval_id", sa.Integer(), nullable=False),
        sa.Column("question", sa.Text(), nullable=False),
        sa.Column("expected_sources", sa.JSON(), nullable=False),
        sa.Column("retrieved_sources", sa.JSON(), nullable=False),
        sa.Column("first_relevant_rank", sa.Integer(), nullable=True),
        sa.Column("best_similarity", sa.Float(), nullable=True),
        sa.Column("low_relevance", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(
            ["retrieval_eval_id"],
            ["retrieval_evals.id"],
            name=op.f("fk_retrieval_eval_results_retrieval_eval_id_retrieval_evals"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_retrieval_eval_results")),
    )
    op.create_index(
        op.f("ix_retrieval_eval_results_retrieval_eval_id"), "retrieval_eval_results", ["retrieval_eval_id"]
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_retrieval_eval_results_retrieval_eval_id"), table_name="retrieval_eval_results")
    op.drop_table("retrieval_eval_results")
    op.drop_index(op.f("ix_retrieval_evals_collection"), table_name="retrieval_evals")
    op.drop_table("retrieval_evals")
    op.drop_index(op.f("ix_turn_retrievals_chunk_id"), table_name="turn_retrievals")
    op.drop_table("turn_retrievals")
    op.drop_table("embedding_cache")
    op.drop_index("ix_knowledge_chunks_document_id_position", table_name="knowledge_chunks")
    op.drop_index(op.f("ix_knowledge_chunks_collection_id"), table_name="knowledge_chunks")
    op.drop_table("knowledge_chunks")
    op.drop_table("knowledge_documents")
    op.drop_table("knowledge_collections")
    with op.batch_alter_table("persona_versions", schema=None) as batch_op:
        batch_op.drop_column("knowledge_threshold")
        batch_op.drop_column("knowledge_k")
        batch_op.drop_column("knowledge_collection")

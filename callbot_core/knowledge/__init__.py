"""Knowledge: documents in (formats, chunking), an index per collection (SQL rows + vectors), hybrid retrieval with
scores, and retrieval evaluation."""

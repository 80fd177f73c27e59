"""The frozen teacher as a training stage: family adapters (`adapters/`), the teacher facade (`teacher.py`), its
frame and text preprocessing (`preprocessing.py`), the start-up check against a student (`compatibility.py`),
relevance generation (`relevance.py`), batch targets (`targets.py`) and the target cache (`cache.py`)."""

"""The bundled clinical world the demo runs on (pipeline layer): the knowledge base (kb.py), the exam
generator (exam.py), the biased tutor (tutor.py) and its texts (text.py), pretraining of the base
model (pretrain.py), and grading a checkpoint on the world's exam (evaluation.py).

Imports: the stages, services, training and the engine; never the demo pipeline or the face
(tests/test_layers.py).
"""

"""minihuatuo: a from-scratch, pure-PyTorch reference implementation of HuatuoGPT-o1
(medical complex reasoning: verifiable problems, an LLM verifier, strategy search + SFT, then PPO
with verifier rewards). See README.md and notes/."""

__version__ = "0.1.0"

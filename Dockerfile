# Training image (CUDA). Build from the repo root:  docker build -f Dockerfile -t llama2_sft:train .
# Run (8 GPUs):  docker run --gpus all --ipc=host -v $PWD/outputs:/app/outputs -v $HOME/.cache/huggingface:/root/.cache/huggingface \
#                  llama2_sft:train torchrun --nproc_per_node=8 train.py +experiment=sft_7b
FROM pytorch/pytorch:2.6.0-cuda12.4-cudnn9-devel
WORKDIR /app
COPY pyproject.toml README.md ./
COPY llama2_sft ./llama2_sft
RUN pip install --no-cache-dir -e ".[deepspeed]"
COPY train.py infer.py ./
COPY conf ./conf
COPY data ./data
ENV TOKENIZERS_PARALLELISM=false
CMD ["python", "train.py"]

# sourced by every call: the packages from site.tar.xz (first call) into /tmp/site, kept while the machine is warm
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore
if [ ! -f /tmp/site/.done ]; then
  mkdir -p /tmp/site && tar -xJf .dev/s5/site.tar.xz -C /tmp/site && touch /tmp/site/.done
fi
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/_bin:$PATH

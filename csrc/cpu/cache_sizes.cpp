// The cache sizes the CPU kernels size their tiles by (stt/cpu_cache.h), for the loader
// (stt_kernels/_isa.py) to report beside the capability and the benchmarks beside their
// figures, and the parser of sysfs size strings, for the tests.
#include <cstdint>

#include "stt/cpu_cache.h"

extern "C" __attribute__((visibility("default"))) int64_t stt_cpu_cache_bytes(int level) {
  const stt::CacheSizes sizes = stt::cpu_cache_sizes();
  return level == 1 ? sizes.l1d : level == 2 ? sizes.l2 : -1;
}

extern "C" __attribute__((visibility("default"))) int64_t stt_parse_cache_size(const char* text) {
  return stt::detail::parse_cache_size(text);
}

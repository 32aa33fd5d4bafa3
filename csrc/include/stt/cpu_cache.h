// Data-cache sizes of the CPU that runs the kernels, read once at first use, so that tile
// sizes follow the machine (a 512 KiB L2 on Zen 3, 1 MiB on Zen 4, 2 MiB on Sapphire Rapids)
// instead of constants tuned on one of them.
//
// Linux describes each cache of cpu0 in /sys/devices/system/cpu/cpu0/cache/index*/ (level,
// type, size such as "1024K"); glibc's sysconf answers from CPUID elsewhere; a CPU neither
// describes gets the sizes of a small desktop core. Hybrid CPUs report cpu0's caches, which a
// tile sized for them fits on either kind of core only roughly: sizes are a budget, not a rule.
#pragma once

#include <unistd.h>

#include <cstdint>
#include <fstream>
#include <string>

namespace stt {

struct CacheSizes {
  int64_t l1d;  // bytes of level-1 data cache per core
  int64_t l2;   // bytes of level-2 cache per core
};

namespace detail {

// "48K", "2048K", "1M" -> bytes; 0 when unreadable.
inline int64_t parse_cache_size(const std::string& text) {
  std::size_t used = 0;
  int64_t value = 0;
  try {
    value = std::stoll(text, &used);
  } catch (...) {
    return 0;
  }
  const char unit = used < text.size() ? text[used] : ' ';
  if (unit == 'K' || unit == 'k') return value << 10;
  if (unit == 'M' || unit == 'm') return value << 20;
  return value;
}

inline int64_t sysfs_cache(int level) {
  for (int index = 0; index < 8; ++index) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/";
    std::ifstream level_file(dir + "level"), type_file(dir + "type"), size_file(dir + "size");
    int found = 0;
    std::string type, size;
    if (!(level_file >> found) || !(type_file >> type) || !(size_file >> size)) continue;
    if (found == level && type != "Instruction") return parse_cache_size(size);
  }
  return 0;
}

inline int64_t sysconf_cache(int name) {
  const long value = sysconf(name);
  return value > 0 ? value : 0;
}

}  // namespace detail

inline CacheSizes cpu_cache_sizes() {
  static const CacheSizes sizes = [] {
    int64_t l1 = detail::sysfs_cache(1), l2 = detail::sysfs_cache(2);
#if defined(_SC_LEVEL1_DCACHE_SIZE) && defined(_SC_LEVEL2_CACHE_SIZE)
    if (l1 <= 0) l1 = detail::sysconf_cache(_SC_LEVEL1_DCACHE_SIZE);
    if (l2 <= 0) l2 = detail::sysconf_cache(_SC_LEVEL2_CACHE_SIZE);
#endif
    // Implausible answers (a VM reporting 0 or a shared L3 as L2) fall back or are capped.
    if (l1 < (8 << 10) || l1 > (1 << 20)) l1 = 32 << 10;
    if (l2 < (128 << 10)) l2 = 512 << 10;
    if (l2 > (4 << 20)) l2 = 4 << 20;
    return CacheSizes{l1, l2};
  }();
  return sizes;
}

}  // namespace stt
